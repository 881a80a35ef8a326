"""fedseg: federated medical image segmentation on NVIDIA FLARE (FedGS, PPPML-HMI, HE, adaptive DP)."""

__version__ = "0.1.0"
