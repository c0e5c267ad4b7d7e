# A LoRA on Qwen-Image's DiT trained with the Blockwise ControlNet (Depth) loaded and frozen: the seed's
# examples/qwen_image/model_training/lora/Qwen-Image-Blockwise-ControlNet-Depth.sh, run by qistudio. As in the seed
# the LoRA goes on the DiT; the ControlNet's residuals are added after each DiT block exactly as at inference. Each
# sample has an image, its prompt and blockwise_controlnet_image (its depth map).
# Use the LoRA with the same ControlNet (see validate_lora/Qwen-Image-Blockwise-ControlNet-Depth.py). The LoRA is
# saved in the diffusers layout; add --lora_format diffsynth for DiffSynth-Studio's own.
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata_blockwise_controlnet_depth.csv \
  --data_file_keys "image,blockwise_controlnet_image" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors,DiffSynth-Studio/Qwen-Image-Blockwise-ControlNet-Depth:model.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-Blockwise-ControlNet-Depth_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1" \
  --lora_rank 32 \
  --extra_inputs "blockwise_controlnet_image" \
  --use_gradient_checkpointing \
  --find_unused_parameters
