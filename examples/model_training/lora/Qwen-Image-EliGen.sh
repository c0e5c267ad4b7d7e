# An EliGen LoRA on Qwen-Image's DiT: the seed's examples/qwen_image/model_training/lora/Qwen-Image-EliGen.sh, run
# by qistudio. The metadata is .json, each sample with lists: "eligen_entity_prompts": ["a girl", ...] and
# "eligen_entity_masks": ["eligen/0.png", ...] (one mask per entity prompt, white = the entity's region; loaded
# one by one). Entity prompts are encoded on their own and packed before the global prompt, with the attention
# mask that keeps each entity to its region, exactly as the pipeline does. Use the LoRA with
# eligen_entity_prompts / eligen_entity_masks (see validate_lora/Qwen-Image-EliGen.py). To continue from a released
# EliGen LoRA (as the seed's EliGen-Poster script does), add --lora_checkpoint with its file.
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata_eligen.json \
  --data_file_keys "image,eligen_entity_masks" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-EliGen_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1" \
  --lora_rank 32 \
  --extra_inputs "eligen_entity_masks,eligen_entity_prompts" \
  --use_gradient_checkpointing \
  --find_unused_parameters
