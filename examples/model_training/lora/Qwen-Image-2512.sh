# LoRA on Qwen-Image-2512's DiT: the seed's examples/qwen_image/model_training/lora/Qwen-Image-2512.sh, run by
# qistudio, with the text encoder and VAE from the 2512 repository itself (the seed takes them from Qwen/Qwen-Image).
# The dataset: modelscope download --dataset DiffSynth-Studio/example_image_dataset --local_dir ./data/example_image_dataset
# One GPU or several (accelerate config); add --resume to continue after an interruption.
# The LoRA is saved in the diffusers layout (transformer.*.lora_A/B.weight), which diffusers, ComfyUI and
# qistudio load; add --lora_format diffsynth for DiffSynth-Studio's own layout.
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image-2512:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image-2512:text_encoder/model*.safetensors,Qwen/Qwen-Image-2512:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-2512_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --dataset_num_workers 8 \
  --find_unused_parameters
