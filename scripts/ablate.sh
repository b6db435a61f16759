#!/usr/bin/env bash
# Module ablations on the demo data at an equal budget: every configs/ablations/*.yaml is trained with the demo
# recipe (train_run_VOC.sh layers it over configs/voc.yaml); its CAMs are scored (at cam.bkg_thre, plus the sweep:
# GT-tuned threshold, oracle — not a protocol number) on the protocol's eval.cam_split (SPEC §8) and on the
# segmentation split (eval.split, null = data.val_split), its segmentation head on the segmentation split without
# DenseCRF; one markdown table compares them (tools/report.py).
# Usage: bash scripts/ablate.sh [key=value ...]        (NGPUS processes, default 2; every key=value reaches every stage)
#        ABLATIONS="full toco baseline" bash scripts/ablate.sh    runs only these configs/ablations/<name>.yaml, in order
#        SEEDS="0 1 2" bash scripts/ablate.sh        trains each config once per seed (run.seed=k); the table shows
#                                                    each config's mean ± std over its seeds, then every run
#        FAMILY=heldout bash scripts/ablate.sh       on the held-out synthetic family (docs/heldout_family.md:
#                                                    data/synthetic_heldout, made here unless data.root= is given);
#                                                    FAMILY=base (default) is data/synthetic_voc, the tuning family
#        EVAL_EVERY=50 bash scripts/ablate.sh        validates every 50 iterations while training (train.eval_every;
#                                                    default: the config's, 0 in the demo) and plots the curves
# Output: runs/ablations/<name>/ per ablation and runs/ablations/ablations.md when neither SEEDS nor a FAMILY other
#         than base is set (the layout from before seeds); otherwise runs/ablations/<family>/<name>/seed<k>/ per run
#         and runs/ablations/<family>/ablations.md; with EVAL_EVERY also curves.png next to the table.
# Every stage is resumable (train.resume=auto; the tools skip finished outputs): rerun the same command to continue.
set -euo pipefail
cd "$(dirname "$0")/.."
family="${FAMILY:-base}"
case "${family}" in
    base) root=data/synthetic_voc make=() ;;
    heldout) root=data/synthetic_heldout make=(--family heldout --num-train 600 --num-val 150 --seed 1) ;;
    *) echo "$0: FAMILY must be base or heldout, not '${family}'" >&2; exit 2 ;;
esac
if [[ -z "${SEEDS:-}" && "${family}" == base ]]; then
    top=runs/ablations seeds=("")  # the layout from before seeds: runs/ablations/<name>
else
    top="runs/ablations/${family}"
    read -r -a seeds <<<"${SEEDS:-0}"
    [[ ${#seeds[@]} -gt 0 ]] || seeds=(0)
    for seed in "${seeds[@]}"; do
        [[ "${seed}" =~ ^[0-9]+$ ]] || { echo "$0: SEEDS must hold integers, not '${seed}'" >&2; exit 2; }
    done
fi
train_extra=()
if [[ -n "${EVAL_EVERY:-}" ]]; then
    [[ "${EVAL_EVERY}" =~ ^[0-9]+$ ]] || { echo "$0: EVAL_EVERY must be an integer, not '${EVAL_EVERY}'" >&2; exit 2; }
    train_extra=("train.eval_every=${EVAL_EVERY}")
fi
for arg in "$@"; do
    case "${arg}" in
        data.root=*) root="${arg#data.root=}" ;;
        run.seed=*) [[ -z "${seeds[0]}" ]] || { echo "$0: SEEDS sets run.seed; drop ${arg}" >&2; exit 2; } ;;
    esac
done
if [[ ! -f "${root}/ImageSets/Segmentation/val.txt" ]]; then
    python -m tools.make_synthetic "${root}" ${make[@]+"${make[@]}"}
fi
if [[ -f "${root}/synthetic.json" ]]; then  # a synthetic root: it must hold the family asked for
    read_family='import json, sys; print(json.load(open(sys.argv[1])).get("family", "base"))'
    made="$(python -c "${read_family}" "${root}/synthetic.json")"  # written before families existed: base
    [[ "${made}" == "${family}" ]] || {
        echo "$0: ${root} holds the ${made} family, not FAMILY=${family}; give another data.root=" >&2
        exit 2
    }
fi
export NGPUS="${NGPUS:-2}"
runs=()
if [[ -n "${ABLATIONS:-}" ]]; then
    configs=()
    for name in ${ABLATIONS}; do
        configs+=("configs/ablations/${name}.yaml")
        [[ -f "${configs[-1]}" ]] || { echo "$0: no ablation config ${configs[-1]}" >&2; exit 2; }
    done
else
    configs=(configs/ablations/*.yaml)
fi
for config in "${configs[@]}"; do
    name="$(basename "${config}" .yaml)"
    for seed in "${seeds[@]}"; do
        if [[ -z "${seed}" ]]; then
            out="${top}/${name}" seeded=()
        else
            out="${top}/${name}/seed${seed}" seeded=("run.seed=${seed}")
        fi
        ./train_run_VOC.sh --config "${config}" "data.root=${root}" "run.out_dir=${out}" train.resume=auto \
            ${train_extra[@]+"${train_extra[@]}"} "$@" ${seeded[@]+"${seeded[@]}"}
        # an assignment, so set -e sees a failure
        splits="$(python -m tools.report --print-splits --run-dir "${out}" "$@")"
        read -r cam_split seg_split <<<"${splits}"
        for split in $(printf '%s\n' "${cam_split}" "${seg_split}" | uniq); do
            scripts/launch.sh tools.make_cam --run-dir "${out}" "$@" "eval.split=${split}"
            scripts/launch.sh tools.evaluate --source cams --sweep --run-dir "${out}" "$@" "eval.split=${split}"
            scripts/launch.sh tools.evaluate --source cams --cam-key cam_aux --run-dir "${out}" "$@" \
                "eval.split=${split}"
        done
        scripts/launch.sh tools.infer_seg --run-dir "${out}" "$@" "eval.split=${seg_split}"
        scripts/launch.sh tools.evaluate --source seg --run-dir "${out}" "$@" "eval.split=${seg_split}"
        runs+=("${out}")
    done
done
curves=()
[[ -z "${EVAL_EVERY:-}" ]] || curves=(--curves "${top}/curves.png")
python -m tools.report --compare "${runs[@]}" --out "${top}/ablations.md" ${curves[@]+"${curves[@]}"}
