"""The `nps` command.

    nps reproduce synthetic   [--out DIR] [--set field=value ...] [--fresh] [--quiet]
    nps reproduce correlation [--out DIR] [--set field=value ...] [--fresh] [--quiet]
    nps reproduce steering    [--out DIR] [--set field=value ...] [--fresh] [--quiet]
    nps reproduce hh-dpo --model MODEL_DIR --data ULTRAFEEDBACK.jsonl [--set field=value ...]
    nps reproduce hh|hht|conflict|continuum --model EMBEDDER_DIR --data ULTRAFEEDBACK.jsonl|PREPARED_DIR
    nps prepare hh|hht|uf-p-2|uf-p-4 --data ULTRAFEEDBACK.jsonl [--out DIR] [--conflict-rate R]
                       [--split-by pair|prompt] [--seed S] [--strict]
    nps reproduce synthetic --print-config     # the typed defaults, as JSON
    nps generate --run DIR --prompt TEXT [--context USER.jsonl] [--toward OTHER.jsonl] [--z-file Z.json]
    nps collect --candidates CANDIDATES.jsonl --profile ME.jsonl [--choices FILE] [--limit N] [--active RUN]
    nps ab --run RUN --profile USER_TYPE=PROFILE.jsonl ... --prompts PROMPTS.txt [--baseline base|RUN[:MODEL]]
           [--scorer oracle|np_btl|vpl|pal-a|pal-b|lore]
    nps compare RUN_A RUN_B [--tolerance 0.02] [--sigmas 2] [--markdown REPORT.md] [--allow-different-data]
                [--allow-missing]
    nps serve --run RUN --candidates CANDIDATES.jsonl --store DIR [--host 127.0.0.1] [--port 8000] [--admin-token T]
    nps profile check PROFILE.jsonl --run RUN [--model np_dpo|vpl_dpo|np_btl_reward|vpl_reward|...] [--json F]
    nps plan [--model qwen2.5-7b|CONFIG.json] [--job np-dpo] [--topology v5e:4x4|h100:8|local] [--mesh data=1,fsdp=16]
             [--batch 16] [--targets 4] [--length 512] [--remat full] [--json PLAN.json] [--measure STEPS]

A re-run with the same --out resumes each model from its last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from nps.errors import NPSError
from nps.experiments import EXPERIMENTS, default_out  # the registry alone: nothing here imports JAX (see ``entry``)
from nps.interrupts import interrupt_safely


RUN_HELP = "a trained policy run: a `nps reproduce steering` or `nps reproduce hh-dpo` folder"


def build_parser() -> argparse.ArgumentParser:
    from nps.workflow.consistency import ALERT_THRESHOLD

    parser = argparse.ArgumentParser(prog="nps", description="Few-shot steerable alignment with neural processes.")
    commands = parser.add_subparsers(dest="command", required=True)
    reproduce = commands.add_parser("reproduce", help="run one of the paper's experiments")
    reproduce.add_argument("experiment", choices=list(EXPERIMENTS),
                           help="; ".join(f"{name}: {e.summary}" for name, e in EXPERIMENTS.items()))
    reproduce.add_argument("--out", default=None, help="output folder (default: runs/<experiment>)")
    reproduce.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field, e.g. --set train.steps=200 --set eval.context_sizes=0,1,10",
    )
    reproduce.add_argument("--model", help="UltraFeedback experiments: hh-dpo's policy base, or the others' embedder "
                           "(a model directory; same as --set model=...)")
    reproduce.add_argument("--data", help="UltraFeedback experiments: the train file or a prepared dataset folder "
                           "(same as --set data=...)")
    reproduce.add_argument("--fresh", action="store_true", help="discard checkpoints and logs in --out and start over")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    reproduce.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    joining = reproduce.add_argument_group(
        "multi-process runs", "every process runs the same command; TPU pod slices, SLURM and Open MPI need none of "
        "these (JAX detects them); elsewhere give all three, or NPS_COORDINATOR, NPS_NUM_PROCESSES, NPS_PROCESS_ID")
    joining.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address and a free port")
    joining.add_argument("--num-processes", type=int, help="how many processes the run has")
    joining.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes − 1")
    joining.add_argument("--join-timeout", type=int, default=120, help="seconds to wait for every process (120)")
    joining.add_argument("--peer-timeout", type=float, default=20.0,
                         help="seconds after which a silent process counts as gone and the others stop (20)")
    reproduce.set_defaults(func=_reproduce, kept=_checkpoints_kept)

    launch = commands.add_parser("launch", help="run an nps command as several local processes of one JAX program")
    launch.add_argument("--local", type=int, required=True, metavar="N", help="how many processes to start here")
    launch.add_argument("--cpu-devices", type=int, metavar="D",
                        help="simulate D CPU devices per process (for trying multi-process runs on one machine)")
    launch.add_argument("--gpus-per-process", type=int, metavar="G",
                        help="give process i the GPUs i·G .. i·G + G − 1 (CUDA_VISIBLE_DEVICES)")
    launch.add_argument("--port", type=int, default=0, help="the coordinator's port (default: a free one)")
    launch.add_argument("program", nargs=argparse.REMAINDER,
                        help="-- then the nps command, e.g. -- reproduce synthetic")
    launch.set_defaults(func=_launch)

    prepare = commands.add_parser("prepare",
                                  help="write UltraFeedback's HH, HHT, UF-P-2 or UF-P-4 pairs as a versioned dataset")
    prepare.add_argument("recipe", choices=("hh", "hht", "uf-p-2", "uf-p-4"))
    prepare.add_argument("--data", required=True, help="UltraFeedback's train split: JSON lines or parquet")
    prepare.add_argument("--out", default="datasets", help="folder for the dataset (default: datasets)")
    prepare.add_argument("--conflict-rate", type=float, default=1.0, help="HH: share of conflicting pairs (1.0)")
    prepare.add_argument("--split-by", choices=("pair", "prompt"), default="pair",
                         help="pair (the paper: prompts may be shared across splits) or prompt")
    prepare.add_argument("--seed", type=int, default=42, help="the split's seed (the paper's: 42)")
    prepare.add_argument("--strict", action="store_true", help="stop at the first malformed record (default: skip "
                         "and count each in the read report)")
    prepare.set_defaults(func=_prepare)

    steer = commands.add_parser("generate", help="generate with a trained steerable policy, steered by a user")
    steer.add_argument("--run", required=True, help=RUN_HELP)
    steer.add_argument("--model", default="np_dpo", help="which trained policy (default np_dpo)")
    steer.add_argument("--prompt", required=True, action="append", help="a prompt (repeat for several)")
    steer.add_argument("--context", help="the user's pairs: JSON lines of prompt/chosen/rejected (default: none)")
    steer.add_argument("--toward", help="a second user's pairs: generate along the line from --context's z to theirs")
    steer.add_argument("--points", type=int, default=5, help="points on the --toward line (default 5)")
    steer.add_argument("--z-file", help="an explicit z: a JSON list of numbers (instead of --context)")
    steer.add_argument("--samples", type=int, default=1, help="responses per prompt and z (default 1)")
    steer.add_argument("--temperature", type=float, default=None, help="default: the run's sampling temperature")
    steer.add_argument("--seed", type=int, default=0)
    steer.set_defaults(func=_generate)
    gather = commands.add_parser("collect", help="ask a user to choose between pairs of responses; write a profile")
    gather.add_argument("--candidates", required=True, help='JSON lines of {"prompt": ..., "responses": [a, b]}')
    gather.add_argument("--profile", required=True, help="the user's profile (JSON lines; resumed if it exists)")
    gather.add_argument("--choices", help="scripted answers, one per line (1, 2 or s), instead of asking; line k "
                        "answers the profile's k-th question, so a rerun after an interruption continues the script")
    gather.add_argument("--limit", type=int, default=None, help="ask at most this many pairs now")
    gather.add_argument("--seed", type=int, default=0, help="seed of the order in which the two responses are shown")
    gather.add_argument("--active", metavar="RUN", help="ask the most informative pair first, judged by a trained "
                        "`nps reproduce steering` run's NP-DPO policy (default: file order)")
    gather.set_defaults(func=_collect, kept=_answers_kept)

    ab = commands.add_parser("ab", help="personalised vs baseline generations per user profile, scored per user")
    ab.add_argument("--run", required=True, help=RUN_HELP)
    ab.add_argument("--model", default="np_dpo", help="the personalised policy (default np_dpo)")
    ab.add_argument("--profile", action="append", default=[], metavar="USER_TYPE=PATH",
                    help="a user's profile and the user type whose reward scores it (repeat)")
    ab.add_argument("--prompts", required=True, help="one prompt per line")
    ab.add_argument("--baseline", default="base", help="'base' (the unconditioned base) or RUN_DIR[:MODEL]")
    ab.add_argument("--samples", type=int, default=4, help="responses per prompt (default 4)")
    ab.add_argument("--seed", type=int, default=0)
    ab.add_argument("--scorer", default="oracle",
                    help="oracle (default): each user type's true reward; np_btl, vpl, pal-a, pal-b or lore: that "
                    "per-user reward model conditioned on the profile, trained once per run")
    ab.add_argument("--scorer-steps", type=int, default=1000, help="a reward scorer's training steps (once per run)")
    ab.add_argument("--out", default="ab", help="folder for ab.json, ab.md and ab.png (default: ab)")
    ab.set_defaults(func=_ab)

    diff = commands.add_parser("compare", help="line up two runs' metrics; exit 1 if B regressed")
    diff.add_argument("run_a", help="the reference run folder (or its results.json)")
    diff.add_argument("run_b", help="the new run")
    diff.add_argument("--tolerance", type=float, default=0.02, help="ignore changes smaller than this (0.02)")
    diff.add_argument("--sigmas", type=float, default=2.0, help="and changes within this many standard errors (2)")
    diff.add_argument("--markdown", help="also write the comparison as a Markdown file")
    diff.add_argument("--allow-different-data", action="store_true", help="compare runs on different datasets")
    diff.add_argument("--allow-missing", action="store_true", help="do not fail when B lacks a model or metric of A "
                      "or has a NaN or infinite one (they are still listed)")
    diff.set_defaults(func=_compare)

    web = commands.add_parser("serve", help="the preference web app: people teach nps, try it and judge it")
    web.add_argument("--run", required=True, help=RUN_HELP)
    web.add_argument("--candidates", required=True, help='JSON lines of {"prompt": ..., "responses": [a, b]}')
    web.add_argument("--store", required=True, help="folder for profiles, A/B judgements and the history of z")
    web.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                     "any other needs --admin-token)")
    web.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    web.add_argument("--admin-token", default=os.environ.get("NPS_ADMIN_TOKEN"),
                     help="turns on the Admin page for whoever gives this token (default: $NPS_ADMIN_TOKEN)")
    web.add_argument("--model", default="np_dpo", help="the steered policy (default np_dpo)")
    web.add_argument("--baseline", default="base", help="blind A/B baseline: 'base' or RUN_DIR[:MODEL]")
    web.add_argument("--particles", type=int, default=256, help="plausible users that choose the questions (256)")
    web.set_defaults(func=_serve, kept=_store_kept)

    profile = commands.add_parser("profile", help="check a profile: implausible answers, position bias, drift")
    profile_commands = profile.add_subparsers(dest="profile_command", required=True)
    check = profile_commands.add_parser("check", help="leave-one-out plausibility of each answer, answers given "
                                        "both ways, position bias and drift, judged by a trained run")
    check.add_argument("profile", help="a profile (JSON lines of prompt/chosen/rejected, e.g. from nps collect/serve)")
    check.add_argument("--run", required=True, help=RUN_HELP)
    check.add_argument("--model", default="np_dpo", help="np_dpo (default), vpl_dpo, or a reward scorer "
                       "`nps ab --scorer KIND` trained: np_btl_reward, vpl_reward, pal_a_reward, ...")
    check.add_argument("--threshold", type=float, default=ALERT_THRESHOLD, help="p-value at which drift and "
                       f"position bias are flagged ({ALERT_THRESHOLD})")
    check.add_argument("--implausible-below", type=float, default=0.2,
                       help="list answers whose leave-one-out probability is below this (0.2)")
    check.add_argument("--permutations", type=int, default=99, help="most permutations of the drift test (99)")
    check.add_argument("--window", type=int, default=24, help="the drift test reads the last this many answers (24)")
    check.add_argument("--min-segment", type=int, default=3, help="fewest answers on each side of a drift (3)")
    check.add_argument("--json", dest="json_path", metavar="JSON", help="also write the report as JSON here")
    check.set_defaults(func=_profile_check)

    plan = commands.add_parser("plan", help="compile a job for a TPU topology or GPU cluster (no device needed): "
                               "per-device memory, FLOPs, roofline step time; exit 1 if it does not fit")
    plan.add_argument("--model", default="qwen2.5-7b",
                      help="a preset (qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, llama-3.1-8b, gemma-7b), a Hugging Face "
                           "config.json or a model folder (default qwen2.5-7b)")
    plan.add_argument("--job", default="np-dpo", help="np-dpo (default), dpo, full-ft, np-btl, embed or generate")
    plan.add_argument("--topology", default="v5e:4x4", help="v5e:2x2 … v5e:16x16, v5p:2x2x2, v6e:4x4 (needs "
                      "'nps[tpu]'), h100:8 or h100:2x8 (needs 'nps[cuda12]'), or local (this process's devices)")
    plan.add_argument("--num-slices", type=int, default=1, help="TPU slices joined over the data-centre network")
    plan.add_argument("--mesh", default="", help="data=N,fsdp=N,tensor=N (default: fsdp over a slice, data over "
                      "slices; generate: tensor parallel where the heads divide)")
    plan.add_argument("--batch", type=int, default=16, help="tasks per step (np-dpo, dpo, np-btl) or sequences "
                      "(full-ft, embed, generate); default 16")
    plan.add_argument("--targets", type=int, default=4, help="target pairs per task, N^T (default 4)")
    plan.add_argument("--context", type=int, default=6, help="context capacity, N^C at most (default 6)")
    plan.add_argument("--length", type=int, default=512, help="tokens per sequence; generate: the prompt (512)")
    plan.add_argument("--new-tokens", type=int, default=3584, help="generate: tokens after the prompt (3584)")
    plan.add_argument("--remat", default="full", help="none, full (default) or dots")
    plan.add_argument("--dtype", default="bfloat16", help="the base's weights: bfloat16 (default) or float32")
    plan.add_argument("--lora-rank", type=int, default=128, help="LoRA rank (128, the paper's)")
    plan.add_argument("--lora-targets", default="q,v", help="projections with LoRA (q,v)")
    plan.add_argument("--feature-dim", type=int, default=4096, help="option features of the context encoder (4096)")
    plan.add_argument("--pairs", type=int, default=28763, help="pairs in the training pool (UltraFeedback HH's)")
    plan.add_argument("--options", type=int, default=71890, help="rows of the pool's options table")
    plan.add_argument("--no-search", action="store_true", help="when it does not fit, do not search for the "
                      "largest batch that does")
    plan.add_argument("--measure", type=int, default=0, metavar="STEPS",
                      help="with --topology local: also run the program STEPS times and time it")
    plan.add_argument("--json", dest="json_path", metavar="JSON",
                      help="also write the plan as JSON here ('-' for stdout only)")
    plan.set_defaults(func=_plan)
    return parser


# -- handlers: each parses nothing more and calls one library function ------------------------------
def _options(args) -> dict:
    """The parsed flags as the library function's keywords (argparse's own fields left out)."""
    return {name: value for name, value in vars(args).items()
            if name not in ("command", "profile_command", "func", "kept")}


def _reproduce(args) -> int:
    from nps.experiments import reproduce

    return reproduce(**_options(args))


def _launch(args) -> int:
    from nps.train.launch import launch_local

    return launch_local(args.local, args.program, cpu_devices=args.cpu_devices,
                        gpus_per_process=args.gpus_per_process, port=args.port)


def _prepare(args) -> None:
    from nps.data.prepared import BuildParameters, prepare_preferences

    prepare_preferences(args.data, args.out, BuildParameters(args.recipe, args.conflict_rate, args.split_by, args.seed),
                        strict=args.strict)


def _generate(args) -> None:
    from nps.workflow.generate import generate_steered

    generate_steered(**_options(args))


def _collect(args) -> int:
    from nps.workflow.collect import collect_profile

    return collect_profile(**_options(args))


def _ab(args) -> None:
    from nps.workflow.ab import ab_command

    ab_command(**_options(args))


def _compare(args) -> int:
    from nps.workflow.compare import compare_command

    return compare_command(**_options(args))


def _serve(args) -> None:
    from nps.serve.app import serve

    serve(args.run, args.candidates, args.store, host=args.host, port=args.port, admin_token=args.admin_token,
          model=args.model, baseline=args.baseline, particles=args.particles)


def _profile_check(args) -> None:
    from nps.workflow.consistency import check_profile_file

    check_profile_file(**_options(args))


def _plan(args) -> int:
    from nps.plan import plan_command

    return plan_command(**_options(args))


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"nps: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        return args.func(args) or 0
    except NPSError as error:
        print(f"nps: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"nps: interrupted: {_what_was_kept(args)}", file=sys.stderr)
        return 130
    except Exception as error:
        from nps.train.distributed import PeerLostError, is_peer_failure, lost_peers

        if not is_peer_failure(error):
            raise
        cause = str(error).strip().splitlines()[0][:160]
        print(f"nps: error: {lost_peers(f'a collective with another process failed: {cause}')}", file=sys.stderr)
        return PeerLostError.exit_code


# -- what a Ctrl-C keeps: one line per command -------------------------------------------------------
NOTHING_HALF_WRITTEN = "nothing was half-written; run the same command again"


def _checkpoints_kept(args) -> str:
    out = args.out or default_out(args.experiment)
    return f"every checkpoint already saved under {out} is kept; run the same command again to resume"


def _answers_kept(args) -> str:
    return f"every answer given so far is saved in {args.profile}; run the same command again to continue"


def _store_kept(args) -> str:
    return f"every acknowledged answer is saved in {args.store}; run the same command again to serve it"


def _what_was_kept(args) -> str:
    """The one line a Ctrl-C prints: what is on disk, and how to go on."""
    return args.kept(args) if hasattr(args, "kept") else NOTHING_HALF_WRITTEN


def entry() -> None:
    """The `nps` program: ``main``, then an exit that skips the interpreter's teardown.

    After an interrupt or a failed checkpoint write, Orbax's and XLA's background threads can
    print tracebacks or crash (SIGSEGV) while Python tears them down; everything nps writes is
    already complete on disk (atomic renames, fsynced appends) when ``main`` returns, so the
    process ends at once with ``main``'s exit status and its one line.

    Ctrl-C stops it at any moment with one line and status 130: this module imports nothing heavy,
    so interrupts are raised only where they propagate (``nps.interrupts``) from before JAX is
    imported, and one that comes before ``main`` can say what was kept, or after it is done, is
    answered here.
    """
    interrupt_safely()
    try:
        code = main()
        sys.stdout.flush()
        sys.stderr.flush()
        if code == 0:
            from nps.train.distributed import leave_run

            leave_run()  # every process of a multi-process run leaves together (JAX's shutdown barrier)
    except KeyboardInterrupt:  # while ``main`` imported what it needs, or after it was done
        print(f"nps: interrupted: {NOTHING_HALF_WRITTEN}", file=sys.stderr)
        sys.stderr.flush()
        code = 130
    except BrokenPipeError:  # the reader of standard output has gone (`nps ... | head`): nothing more can be shown
        print(f"nps: stopped: standard output was closed by the program reading it; {NOTHING_HALF_WRITTEN}",
              file=sys.stderr)
        sys.stderr.flush()
        code = 141  # 128 + SIGPIPE, as a shell reports a program that a closed pipe stopped
    os._exit(code)


if __name__ == "__main__":
    entry()
