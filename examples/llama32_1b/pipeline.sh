#!/usr/bin/env bash
# The whole recipe for Llama 3.2 1B on one GPU node: SFT -> reward model -> offline DPO -> online DPO.
# Every step is one command of this project; paths follow the shipped configs (edit them or
# pass key=value overrides). Nothing here runs on the CPU-only CI; the tiny world is the CPU demo.
#
#   bash examples/llama32_1b/pipeline.sh
set -euo pipefail
HF=./model_from_hf/llama32-1b-hf          # a local HF checkpoint of meta-llama/Llama-3.2-1B (+ tokenizer)

# 1. Tokenize the raw data into Megatron indexed datasets (llama3 chat template).
python preprocess_data.py --input ./raw/alpaca.parquet --tokenizer-name-or-path "$HF" \
    --output-prefix ./dataset/alpaca_llama3 --handler-name AlpacaStyleInstructionHandler --prompt-type llama3 --workers 8
python preprocess_data.py --input ./raw/ultrafeedback_binarized --dataset-adapter ultrafeedback_binarized \
    --tokenizer-name-or-path "$HF" --output-prefix ./dataset/ultrafeedback_llama3 \
    --handler-name AlpacaStylePairwiseHandler --prompt-type llama3 --workers 8
python preprocess_data.py --input ./raw/hh_rlhf --dataset-adapter hh_rlhf --tokenizer-name-or-path "$HF" \
    --output-prefix ./dataset/hh_rlhf_llama3_rm --handler-name AlpacaStyleRewardHandler --prompt-type llama3 --workers 8

# 2. SFT (2 GPUs, DP=2); the exported HF model is the starting point of everything after.
python ray_gpt.py --config-name sft_trainer_llama32_1b
mkdir -p ./ckpt && rm -rf ./ckpt/llama32-1b-sft && cp -r runs/sft_llama32_1b/hf_actor ./ckpt/llama32-1b-sft

# 3. Reward model from the SFT model (fresh value head), Bradley-Terry on preference pairs.
python ray_gpt.py --config-name rm_trainer_llama32_1b
rm -rf ./ckpt/llama32-1b-rm && cp -r runs/rm_llama32_1b/hf_reward ./ckpt/llama32-1b-rm

# 4. Offline DPO from the SFT model (the reference defaults to the same weights).
python ray_gpt.py --config-name dpo_trainer_llama32_1b

# 5. Online DPO: sample, score with the reward model, pair, update (actor 1 train + 1 infer GPU).
#    Prompts: JSONL files of {"prompt": ...} (or a PPOAlpacaStyleInstructionHandler prefix).
python ray_gpt.py --config-name online_dpo_trainer_llama32_1b \
    data.train_path=./dataset/prompts_train.jsonl data.eval_path=./dataset/prompts_eval.jsonl
