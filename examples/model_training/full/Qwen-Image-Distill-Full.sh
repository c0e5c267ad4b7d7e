# Full fine-tuning of the distilled DiT (DiffSynth-Studio/Qwen-Image-Distill-Full): the seed's
# examples/qwen_image/model_training/full/Qwen-Image-Distill-Full.sh, run by qistudio, with the ordinary
# flow-matching loss (distillation itself, the seed's --task direct_distill, is not supported yet). The result holds
# plain DiT names: load it with ModelConfig(path=...) in place of the Distill-Full files and sample as the distilled
# model is sampled (15 steps, cfg_scale 1; see validate_full/Qwen-Image-Distill-Full.py).
#
# Memory: the seed runs this under DeepSpeed ZeRO-2 with CPU offload on 8 GPUs
# (--config_file .../accelerate_config_zero2offload.yaml). qistudio's trainer does not support DeepSpeed yet, so as
# written it uses plain data parallelism: the 20B DiT with AdamW needs ~160 GB per process and does not fit an
# 80 GB GPU. Use it for smaller DiTs, or wait for the ZeRO support planned in issue 10.
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata.csv \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "DiffSynth-Studio/Qwen-Image-Distill-Full:diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-5 \
  --num_epochs 2 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-Distill-Full_full" \
  --trainable_models "dit" \
  --use_gradient_checkpointing
