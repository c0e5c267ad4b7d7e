# Full training of the Blockwise ControlNet (Depth), the DiT frozen: the seed's
# examples/qwen_image/model_training/full/Qwen-Image-Blockwise-ControlNet-Depth.sh, run by qistudio. Each sample has
# an image, its prompt and blockwise_controlnet_image (its depth map). The result
# (epoch-N.safetensors) has the released ControlNet file's names (the prefix below is stripped): load it with
# ModelConfig(path=...) beside the base model (see validate_full/Qwen-Image-Blockwise-ControlNet-Depth.py).
#
# From scratch: leave the ControlNet out of --model_id_with_origin_paths and qistudio starts from a new one whose
# outputs (img_in, every output_proj) are zero, as the seed's Initialize script makes it; keep the high learning rate.
# Memory (an estimate, not measured): the frozen 20B DiT in bfloat16 (~41 GB) plus the 1.1B ControlNet with its
# gradients and AdamW state in bfloat16 (~9 GB) and the activations kept by gradient checkpointing; the seed runs it
# with plain DDP (Inpaint: ZeRO-2 without offload).
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata_blockwise_controlnet_depth.csv \
  --data_file_keys "image,blockwise_controlnet_image" \
  --max_pixels 1048576 \
  --dataset_repeat 400 \
  --model_id_with_origin_paths "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors,DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Depth:model.safetensors" \
  --learning_rate 1e-3 \
  --num_epochs 2 \
  --remove_prefix_in_ckpt "pipe.blockwise_controlnet.models.0." \
  --output_path "./models/train/Qwen-Image-Blockwise-ControlNet-Depth_full" \
  --trainable_models "blockwise_controlnet" \
  --extra_inputs "blockwise_controlnet_image" \
  --use_gradient_checkpointing \
  --find_unused_parameters
