#!/usr/bin/env bash
# The README quickstart, fully offline: demo corpus -> data stats -> spectrogram PNGs -> central training
# -> federated simulation -> TFLite export -> prediction with LiteRT. Run it with `make quickstart`.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "1/7 Synthetic, speaker-structured demo corpus"
dsl_fed make-demo-data demo_data --seed 0

step "2/7 What is in it"
dsl_fed data-stats configs/quickstart.yaml

step "3/7 What the network sees: one PNG per chunk"
dsl_fed plot demo_data/audio/spk01/falling_00.wav --config configs/quickstart.yaml --out runs/spectrograms

step "4/7 Central training (the paper's protocol on the tiny preset)"
dsl_fed train --central configs/quickstart.yaml --verbose 2 --overwrite

step "5/7 Federated training: 3 Flower clients, 2 speakers each; no audio leaves a client"
dsl_fed simulate configs/quickstart.yaml output.name=quickstart-fed --overwrite

step "6/7 Export the central model to int8 TFLite (raw audio in)"
dsl_fed export runs/quickstart/model.keras --quantization int8

step "7/7 Predict a test speaker's clip with LiteRT, as a device would"
dsl_fed predict runs/quickstart/tflite_int8/model.tflite demo_data/audio/spk03/rising_00.wav

printf '\nDone. Reports: runs/quickstart/report.md, runs/quickstart-fed/history.csv, plots in runs/*/plots/\n'
