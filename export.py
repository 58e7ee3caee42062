"""Export a run's student as ONNX and TorchScript, checked against PyTorch: python export.py --run_dir runs/TaskX_..."""

from kd.export import main

if __name__ == "__main__":
    main()
