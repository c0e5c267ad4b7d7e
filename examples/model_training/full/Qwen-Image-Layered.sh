# Full fine-tuning of Qwen-Image-Layered's DiT: DiffSynth-Studio's examples/qwen_image/model_training/full/
# Qwen-Image-Layered.sh, run by qistudio (data as in ../lora/Qwen-Image-Layered.sh). The result holds plain DiT names:
# load it with ModelConfig(path="models/train/Qwen-Image-Layered_full/epoch-1.safetensors") in place of the
# transformer files. Memory: the 20B DiT, as full/Qwen-Image.sh says (put --config_file
# examples/model_training/full/accelerate_config_zero2offload.yaml after `accelerate launch`, as the original does).
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/diffsynth_example_dataset/qwen_image/Qwen-Image-Layered \
  --dataset_metadata_path data/diffsynth_example_dataset/qwen_image/Qwen-Image-Layered/metadata.json \
  --data_file_keys "image,layer_input_image" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image-Layered:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image-Layered:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-5 \
  --num_epochs 2 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-Layered_full" \
  --trainable_models "dit" \
  --extra_inputs "layer_num,layer_input_image" \
  --use_gradient_checkpointing \
  --dataset_num_workers 8 \
  --find_unused_parameters
