# LoRA on Qwen-Image-Edit's DiT: the seed's examples/qwen_image/model_training/lora/Qwen-Image-Edit.sh, run by
# qistudio. The metadata lists image (the edited result), prompt (the instruction) and edit_image (the picture to
# edit); the edit image is read by the text encoder through the Edit processor (default
# Qwen/Qwen-Image-Edit:processor/) and appended as VAE latents after the target, as at inference. For Edit-2509's
# several images, give edit_image as a list in a .json metadata file. The LoRA is saved in the diffusers layout; add
# --lora_format diffsynth for DiffSynth-Studio's own.
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata_edit.csv \
  --data_file_keys "image,edit_image" \
  --extra_inputs "edit_image" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image-Edit:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-Edit_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --dataset_num_workers 8 \
  --find_unused_parameters
