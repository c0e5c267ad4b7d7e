# Full training of the Blockwise ControlNet (Inpaint), the DiT frozen: the seed's
# examples/qwen_image/model_training/full/Qwen-Image-Blockwise-ControlNet-Inpaint.sh, run by qistudio. Each sample has
# an image, its prompt, blockwise_controlnet_image (the image to repaint) and blockwise_controlnet_inpaint_mask
# (white = the region to repaint; the ControlNet sees the image with it blacked out, plus the mask). The result
# (epoch-N.safetensors) has the released ControlNet file's names (the prefix below is stripped): load it with
# ModelConfig(path=...) beside the base model (see validate_full/Qwen-Image-Blockwise-ControlNet-Inpaint.py).
#
# From scratch: leave the ControlNet out of --model_id_with_origin_paths and qistudio starts from a new one whose
# outputs (img_in, every output_proj) are zero, as the seed's Initialize script makes it; keep the high learning rate.
# Memory (an estimate, not measured): the frozen 20B DiT in bfloat16 (~41 GB) plus the 1.1B ControlNet with its
# gradients and AdamW state in bfloat16 (~9 GB) and the activations kept by gradient checkpointing; the seed runs it
# with plain DDP (Inpaint: ZeRO-2 without offload).
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata_blockwise_controlnet_inpaint.csv \
  --data_file_keys "image,blockwise_controlnet_image,blockwise_controlnet_inpaint_mask" \
  --max_pixels 1048576 \
  --dataset_repeat 400 \
  --model_id_with_origin_paths "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors,DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Inpaint:model.safetensors" \
  --learning_rate 1e-3 \
  --num_epochs 2 \
  --remove_prefix_in_ckpt "pipe.blockwise_controlnet.models.0." \
  --output_path "./models/train/Qwen-Image-Blockwise-ControlNet-Inpaint_full" \
  --trainable_models "blockwise_controlnet" \
  --extra_inputs "blockwise_controlnet_image,blockwise_controlnet_inpaint_mask" \
  --use_gradient_checkpointing \
  --find_unused_parameters
