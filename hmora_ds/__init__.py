"""hmora-ds: HMoRA (hierarchical mixture of LoRA experts) fine-tuning on DeepSpeed."""

__version__ = "0.1.0"
