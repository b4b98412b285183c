"""Job flag groups (training/jobs: mark_job_flag, add_argument_once; resolved by training/params.py): the
job a command line's flags imply when no --job is given, one line for a flag of another job, and --help listing
every job's flags."""
import pytest

from foundation.errors import UserError


def _parse(*argv):
    from training.params import parse_args

    return parse_args(["--train-data", "x.tsv", *argv])


def test_protorkd_flags_without_job_run_protorkd():
    args = _parse("--pretrained-text", "all-MiniLM-L6-v2", "--add-projection-head", "--projection-dim", "384")
    assert args.job == "protorkd"
    assert args.job_from_flags == "--pretrained-text, --add-projection-head, --projection-dim"
    plain = _parse("--epochs", "3")  # trainer flags only: the default job, nothing inferred
    assert plain.job == "clip" and plain.job_from_flags is None


def test_a_flag_of_another_job_is_one_line_naming_its_job():
    with pytest.raises(UserError, match=r"^--k belongs to --job protorkd: not a flag of --job clip"):
        _parse("--job", "clip", "--k", "5")
    with pytest.raises(UserError, match=r"^--p/--prune-ratio belongs to --job prune: not a flag of --job distill"):
        _parse("--job", "distill", "--p", "0.3")
    # a flag two jobs share (add_argument_once) belongs to each of them
    assert _parse("--job", "distill", "--teacher-model", "x").job == "distill"
    assert _parse("--job", "protorkd", "--teacher-model", "x").job == "protorkd"
    with pytest.raises(UserError, match=r"--teacher-model \(--job distill or protorkd\); pass --job"):
        _parse("--teacher-model", "x")
    with pytest.raises(UserError, match=r"--distill-loss \(--job distill\), --k \(--job protorkd\)"):
        _parse("--k", "3", "--distill-loss", "cosine")


def test_help_still_lists_every_jobs_flags(capsys):
    from training.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    stdout = capsys.readouterr().out
    assert "--job protorkd:" in stdout and "--kmeans-max-points-per-centroid" in stdout
