#!/usr/bin/env bash
# The original's Video-LLaVA LoRA command (rank 128, alpha 256, ZeRO-3, bf16), for vidlora.
#
#   MODEL=/path/to/Video-LLaVA-7B DATA=data.json DATA_ROOT=/path/to/media bash scripts/finetune_lora.sh
#
# Any extra arguments are appended, and a flag given twice takes its last value, e.g.
#   bash scripts/finetune_lora.sh --deepspeed configs/zero3_offload.json --report_to none
#
# Variables (defaults in brackets):
#   MODEL [LanguageBind/Video-LLaVA-7B]  DATA [data.json]  DATA_ROOT [.]  OUTPUT_DIR [./checkpoints/Video-LLaVA-7B]
#   DS_CONFIG [configs/zero3.json]  NPROC [number of GPUs, or 2 on a CPU-only machine]  REPORT_TO [wandb]
#   CPU=1 forces the CPU path (it is also chosen when nvidia-smi finds no GPU): DeepSpeed's CPU
#   accelerator with gloo, --tf32 False (TF32 is an NVIDIA feature); bf16 stays on.
# See configs/README.md for what each config is for and how DeepSpeed runs on a CPU.
set -euo pipefail

cd "$(dirname "$0")/.."
MODEL=${MODEL:-LanguageBind/Video-LLaVA-7B}
DATA=${DATA:-data.json}
DATA_ROOT=${DATA_ROOT:-.}
OUTPUT_DIR=${OUTPUT_DIR:-./checkpoints/Video-LLaVA-7B}
DS_CONFIG=${DS_CONFIG:-configs/zero3.json}
REPORT_TO=${REPORT_TO:-wandb}

if [[ "${CPU:-0}" != "1" ]] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    NPROC=${NPROC:-$(nvidia-smi -L | wc -l)}
    DEVICE_FLAGS=(--tf32 True)
else
    export DS_ACCELERATOR=cpu
    NPROC=${NPROC:-2}
    DEVICE_FLAGS=(--tf32 False)
fi

exec deepspeed --num_gpus "$NPROC" --module vidlora.train \
    --deepspeed "$DS_CONFIG" \
    --model_name_or_path "$MODEL" \
    --lora_enable True --lora_r 128 --lora_alpha 256 \
    --version v1 \
    --data_path "$DATA" \
    --video_folder "$DATA_ROOT" \
    --image_folder "$DATA_ROOT" \
    --X "Video" "Image" \
    --video_tower LanguageBind/LanguageBind_Video_merge \
    --image_tower LanguageBind/LanguageBind_Image \
    --mm_projector_type mlp2x_gelu \
    --mm_vision_select_layer -2 \
    --mm_use_x_start_end False \
    --mm_use_x_patch_token False \
    --image_aspect_ratio pad \
    --group_by_modality_length True \
    --bf16 True \
    --output_dir "$OUTPUT_DIR" \
    --num_train_epochs 2 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 8 \
    --evaluation_strategy "epoch" \
    --save_strategy "steps" \
    --save_steps 50 \
    --save_total_limit 1 \
    --learning_rate 2e-4 \
    --weight_decay 0. \
    --warmup_ratio 0.03 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --model_max_length 2048 \
    --gradient_checkpointing True \
    --dataloader_num_workers 4 \
    --lazy_preprocess True \
    --cache_dir "./cache_dir" \
    --report_to "$REPORT_TO" \
    "${DEVICE_FLAGS[@]}" \
    "$@"
