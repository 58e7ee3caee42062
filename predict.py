"""Classify images with a run's student: python predict.py --run_dir RUN IMAGES_OR_FOLDERS... [--topk 3] [--csv F]"""

from kd.predict import main

if __name__ == "__main__":
    main()
