#!/bin/sh
# The Fashion-MNIST study (benchmarks/results/fashion_mnist/README.md), phase by phase; every phase can be rerun and
# continues where it stopped (tools/sweep.py skips finished runs and resumes interrupted ones).
#   sh benchmarks/fashion_mnist_study.sh teacher|tune|baselines|expkd|explain|figure|table
set -e
PY=${PYTHON:-.venv/bin/python}
C=configs/fashion_mnist
OUT=benchmarks/results/fashion_mnist
TUNE=benchmarks/results/fashion_mnist_tuning
TEACHER=$OUT/teacher/base/seed0/student_best
BASELINES="$C/vanilla.yaml $C/kd.yaml $C/dkd.yaml"
EXPKD="$C/expkd_cam.yaml $C/expkd_gradcam.yaml $C/expkd_lrp.yaml"
case "$1" in
teacher)  # resnet20 on all 60,000 training images
    $PY tools/sweep.py --cfg $C/teacher.yaml --out $OUT --jobs 1 ;;
tune)  # the explanation weight of each Exp-KD explainer, on 5,000 training images held out (never the test split)
    $PY tools/sweep.py --cfg $C/kd.yaml --jobs 2 --out $TUNE DATASET.VALIDATION_FROM_TRAIN 5000
    $PY tools/sweep.py --cfg $EXPKD --grid EXPKD.EXP_WEIGHT=5,50 --jobs 2 --out $TUNE \
        DATASET.VALIDATION_FROM_TRAIN 5000
    # LRP lost to KD at both weights, the larger one more: one step further down
    $PY tools/sweep.py --cfg $C/expkd_lrp.yaml --grid EXPKD.EXP_WEIGHT=0.5 --jobs 1 --out $TUNE \
        DATASET.VALIDATION_FROM_TRAIN 5000
    $PY tools/summarize.py $TUNE --group-by EXPERIMENT.NAME EXPKD.EXP_WEIGHT --metric best ;;
baselines)  # vanilla, KD, DKD, CAT-KD: seeds 0-2, both pairs, evaluated on the test split
    $PY tools/sweep.py --cfg $BASELINES $C/catkd.yaml --seeds 0 1 2 --jobs 2 --out $OUT/resnet8
    $PY tools/sweep.py --cfg $BASELINES $C/catkd_mv2.yaml --seeds 0 1 2 --jobs 2 --out $OUT/MobileNetV2 \
        DISTILLER.STUDENT MobileNetV2 ;;
expkd)  # Exp-KD with the weights chosen by `tune`, the same seeds and pairs
    $PY tools/sweep.py --cfg $EXPKD --seeds 0 1 2 --jobs 2 --out $OUT/resnet8
    $PY tools/sweep.py --cfg $EXPKD --seeds 0 1 2 --jobs 2 --out $OUT/MobileNetV2 DISTILLER.STUDENT MobileNetV2 ;;
explain)  # agreement with the teacher and perturbation AUC of every finished run (the first 500 test images, CAM)
    $PY tools/explain_eval.py runs $OUT -t resnet20 -tc $TEACHER --method cam --num-images 500 ;;
figure)  # teacher | KD student | Exp-KD student CAMs (seed 0, resnet8) on the same test images
    $PY tools/visualize.py heatmaps -m resnet20 -c $TEACHER -m resnet8 -c $OUT/resnet8/kd/base/seed0/student_latest \
        -m resnet8 -c $OUT/resnet8/${FIGURE_EXPKD:-expkd_cam}/base/seed0/student_latest \
        --labels "teacher resnet20" "KD resnet8" "Exp-KD (${FIGURE_EXPKD:-expkd_cam}) resnet8" -d fashion_mnist \
        --data-root /usr/share/datasets/fashion-mnist --method cam --num-images 8 \
        --out docs/images/fashion_mnist_heatmaps.png ;;
table)
    $PY tools/summarize.py $OUT --group-by student EXPERIMENT.NAME --baseline EXPERIMENT.NAME=kd ;;
*)
    echo "usage: sh benchmarks/fashion_mnist_study.sh teacher|tune|baselines|expkd|explain|figure|table" >&2; exit 2 ;;
esac
