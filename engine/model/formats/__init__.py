"""Weight-file formats, one module each; every conversion is a pure state-dict filter in the spirit
of timm's ``checkpoint_filter_fn`` (state dict + model in, state dict in timm's names out):

* ``dinov2``: official DINOv2 hub ``.pth`` and DINOv2 training checkpoints;
* ``mae``: official MAE ``.pth``, with the decoder kept for the MAE objective;
* ``trainer_checkpoint``: geoexplora trainer checkpoint directories (LoRA merged on load);
* ``adapter``: geoexplora ExPLoRA adapter files;
* ``merged``: the merged export, a plain timm state dict (the timm layout needs no filter);
* ``peft_export``: the PEFT LoRA layout.

``engine.model.weights`` reads a file, recognises its format and applies its filter;
``engine.model.state_fit`` then fits the result to the model.
"""
