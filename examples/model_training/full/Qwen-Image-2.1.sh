# Full fine-tuning of Qwen-Image 2.1's DiT (7B), with the seed's train arguments (data and editing as in
# ../lora/Qwen-Image-2.1.sh). The result holds plain DiT names, which diffusers' QwenImage21Transformer2DModel also
# reads: load it with ModelConfig(path="models/train/Qwen-Image-2.1_full/epoch-1.safetensors") in place of the
# transformer files. Memory: bf16 weights, gradients and AdamW's two moments of 7B parameters are ~56 GB before
# activations; put --config_file examples/model_training/full/accelerate_config_zero2offload.yaml after
# `accelerate launch` on smaller GPUs.
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image-2.1:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image-2.1:text_encoder/model*.safetensors,Qwen/Qwen-Image-2.1:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-5 \
  --num_epochs 2 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-2.1_full" \
  --trainable_models "dit" \
  --use_gradient_checkpointing \
  --find_unused_parameters
