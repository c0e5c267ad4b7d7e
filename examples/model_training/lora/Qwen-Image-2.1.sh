# LoRA on Qwen-Image 2.1's DiT, with the seed's train arguments. The model is told from its files; its prompts go
# through Qwen3-VL's processor (default: the DiT repository's processor/, here Qwen/Qwen-Image-2.1:processor/).
# Images are trained as RGBA (transparency kept; pictures without alpha are opaque). For editing, add edit images
# to the metadata (one path, or a .json list of up to ten) and pass --data_file_keys "image,edit_image"
# --extra_inputs "edit_image": each is sized to the target's area and read both by Qwen3-VL and, as latents, in the
# DiT's prefix, as at inference. No KV cache in training: each step computes the prefix once, with gradients.
# The targets are 2.1's linears (attention and its SwiGLU MLP); the Qwen-Image list names layers 2.1 lacks.
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image-2.1:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image-2.1:text_encoder/model*.safetensors,Qwen/Qwen-Image-2.1:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-2.1_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,to_out.0,img_mlp.proj,img_mlp.gate_layer,img_mlp.out" \
  --lora_rank 32 \
  --use_gradient_checkpointing \
  --dataset_num_workers 8 \
  --find_unused_parameters
