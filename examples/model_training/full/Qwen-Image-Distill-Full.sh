# Full fine-tuning of the distilled DiT (DiffSynth-Studio/Qwen-Image-Distill-Full): the seed's
# examples/qwen_image/model_training/full/Qwen-Image-Distill-Full.sh, run by qistudio, with the ordinary
# flow-matching loss (distillation itself, the seed's --task direct_distill, is not supported yet). The result holds
# plain DiT names: load it with ModelConfig(path=...) in place of the Distill-Full files and sample as the distilled
# model is sampled (15 steps, cfg_scale 1; see validate_full/Qwen-Image-Distill-Full.py).
#
# Memory: the 20B DiT with AdamW needs ~160 GB (bf16 weights, gradients and two moments), more than one GPU has.
# Put --config_file examples/model_training/full/accelerate_config_fsdp2.yaml after `accelerate launch` (FSDP2: each
# of N GPUs holds 1/N of that, reading only its shard from the files; an estimate, not yet measured: ~40 GB per GPU
# on 4 before activations), or the seed's accelerate_config_zero2offload.yaml / accelerate_config_zero3.yaml
# (DeepSpeed; ZeRO-3 also reads each process's partition only). As written (one process per GPU, plain data
# parallelism) it suits smaller DiTs.
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
