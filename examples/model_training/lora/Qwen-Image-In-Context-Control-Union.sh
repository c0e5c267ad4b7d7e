# The In-Context-Control-Union LoRA on Qwen-Image's DiT: the seed's
# examples/qwen_image/model_training/lora/Qwen-Image-In-Context-Control-Union.sh, run by qistudio. The metadata
# lists image, prompt and context_image (its control map: canny, depth, pose, ...); the control map is resized to
# the image, VAE-encoded and appended after the target (frame 1), and prompts get the trigger "Context_Control. "
# prepended where missing, exactly as the pipeline does at inference. A sample may leave context_image empty.
# Like the seed, this continues from the released LoRA (rank 64); download it first:
#   modelscope download --model DiffSynth-Studio/Qwen-Image-In-Context-Control-Union --local_dir models/DiffSynth-Studio/Qwen-Image-In-Context-Control-Union
# or remove --lora_checkpoint to train from scratch. Use it with context_image
# (see validate_lora/Qwen-Image-In-Context-Control-Union.py).
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata_in_context.csv \
  --data_file_keys "image,context_image" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-In-Context-Control-Union_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1" \
  --lora_rank 64 \
  --lora_checkpoint "models/DiffSynth-Studio/Qwen-Image-In-Context-Control-Union/model.safetensors" \
  --extra_inputs "context_image" \
  --use_gradient_checkpointing \
  --find_unused_parameters
