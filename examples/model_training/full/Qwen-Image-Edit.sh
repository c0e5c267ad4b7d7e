# Full fine-tuning of Qwen-Image-Edit's DiT: the seed's examples/qwen_image/model_training/full/Qwen-Image-Edit.sh,
# run by qistudio. Each sample's edit_image is read by the text encoder (through the Edit processor) and appended
# as VAE latents after the target, as at inference. The result (epoch-N.safetensors) holds plain DiT names: load it
# with ModelConfig(path=...) in place of the Qwen-Image-Edit transformer files (see validate_full/Qwen-Image-Edit.py).
# The metadata lists image, prompt and edit_image (the picture to edit); the seed's full script still passes an
# older --edit_model flag, here the edit inputs are named with --data_file_keys / --extra_inputs as in its LoRA script.
#
# Memory: the 20B DiT with AdamW needs ~160 GB (bf16 weights, gradients and two moments), more than one GPU has.
# Put --config_file examples/model_training/full/accelerate_config_fsdp2.yaml after `accelerate launch` (FSDP2: each
# of N GPUs holds 1/N of that, reading only its shard from the files; an estimate, not yet measured: ~40 GB per GPU
# on 4 before activations), or the seed's accelerate_config_zero2offload.yaml / accelerate_config_zero3.yaml
# (DeepSpeed; ZeRO-3 also reads each process's partition only). As written (one process per GPU, plain data
# parallelism) it suits smaller DiTs.
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/example_image_dataset \
  --dataset_metadata_path data/example_image_dataset/metadata_edit.csv \
  --data_file_keys "image,edit_image" \
  --extra_inputs "edit_image" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image-Edit:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-5 \
  --num_epochs 2 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-Edit_full" \
  --trainable_models "dit" \
  --use_gradient_checkpointing \
  --find_unused_parameters
