# LoRA on Qwen-Image-Layered's DiT: DiffSynth-Studio's examples/qwen_image/model_training/lora/Qwen-Image-Layered.sh,
# run by qistudio. The model is told from its files. Each metadata.json sample lists in `image` the composite and
# then its RGBA layers, bottom first (the frames the model generates; `qistudio layers` writes layers in that
# order), in `layer_input_image` the picture the layers decompose, and optionally `layer_num` (the layer count):
#   [{"image": ["composite.png", "layer_1.png", "layer_2.png", "layer_3.png"], "layer_input_image": "input.png",
#     "layer_num": 3, "prompt": "a poster"}]
# All of a sample's files must come out at one size. Frames and input are read as RGBA through Layered's RGBA VAE;
# the prompt is used as given (inference captions an empty one; training does not, as the reference).
# The dataset of the original script:
#   modelscope download --dataset DiffSynth-Studio/diffsynth_example_dataset --include "qwen_image/Qwen-Image-Layered/*" --local_dir ./data/diffsynth_example_dataset
accelerate launch --module qistudio.cli.main train \
  --dataset_base_path data/diffsynth_example_dataset/qwen_image/Qwen-Image-Layered \
  --dataset_metadata_path data/diffsynth_example_dataset/qwen_image/Qwen-Image-Layered/metadata.json \
  --data_file_keys "image,layer_input_image" \
  --max_pixels 1048576 \
  --dataset_repeat 50 \
  --model_id_with_origin_paths "Qwen/Qwen-Image-Layered:transformer/diffusion_pytorch_model*.safetensors,Qwen/Qwen-Image:text_encoder/model*.safetensors,Qwen/Qwen-Image-Layered:vae/diffusion_pytorch_model.safetensors" \
  --learning_rate 1e-4 \
  --num_epochs 5 \
  --remove_prefix_in_ckpt "pipe.dit." \
  --output_path "./models/train/Qwen-Image-Layered_lora" \
  --lora_base_model "dit" \
  --lora_target_modules "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1" \
  --lora_rank 32 \
  --extra_inputs "layer_num,layer_input_image" \
  --use_gradient_checkpointing \
  --dataset_num_workers 8 \
  --find_unused_parameters
