"""What the vLLM tests need of the machine."""


def vllm_gpus() -> int:
    """CUDA GPUs vLLM could use here: 0 without vLLM, torch or a CUDA device."""
    try:
        import torch
        import vllm  # noqa: F401
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0
