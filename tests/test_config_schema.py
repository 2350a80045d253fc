"""Nonsense on the command line fails at composition, in one line naming the key."""

from __future__ import annotations

import pytest

from kdpipe.cli import CONFIG_PATH
from kdpipe.errors import ConfigError
from kdpipe.overrides import check


@pytest.mark.parametrize("args, named", [
    (["student.model.widht=3"], "did you mean student.model.width?"),
    (["data=cifar10", "data.limit_trian=5"], "did you mean data.limit_train?"),  # keys of the chosen option
    (["-m", "distill.temperature=1,2", "optim.lrr=0.1"], "did you mean optim.lr?"),
    (["nosuch=1"], "the root config has no key 'nosuch'"),
])
def test_unknown_keys_are_named_with_the_closest_existing_key(args, named):
    with pytest.raises(ConfigError, match=named.replace("?", r"\?")):
        check(args, CONFIG_PATH)


@pytest.mark.parametrize("args, named", [
    (["distill.temperature=hot"], "distill.temperature takes a number"),
    (["trainer.max_epochs=2.5"], "trainer.max_epochs takes an integer"),
    (["reuse=maybe"], "reuse takes a boolean"),
    (["-m", "distill.temperature=1,2,hot"], "distill.temperature=hot"),  # every value of a sweep
    (["eval=3"], "eval takes a mapping"),
    (["optim=3"], "Config group override must be a string"),  # optim is a group: its options are names
])
def test_a_value_of_the_wrong_type_is_refused_with_the_key_and_its_default(args, named):
    with pytest.raises(ConfigError, match=named):
        check(args, CONFIG_PATH)


@pytest.mark.parametrize("args", [
    ["distill.temperature=8", "optim.lr=1"],  # an integer where a float is expected is fine
    ["-m", "distill.temperature=1,2,4", "student=mlp"],
    ["trainer.devices=auto"],  # Lightning takes an int or a string here
    ["+experiment_note=first try"],  # + adds a key on purpose
    ["student.model.num_classes=${data.num_classes}"],
    ["data=cifar10", "data.root=/somewhere", "data.limit_train=100"],
    ["-m", "distill.temperature=interval(1,16)"],  # a sweeper samples it: not enumerated here
    # a key of the second option only
    ["-m", "prune=magnitude,structured", "prune.pruner.global_pruning=true"],
    ["prune=structured", "prune/schedule=agp", "prune/importance=taylor", "prune.schedule.frequency=5"],
])
def test_valid_overrides_pass(args):
    check(args, CONFIG_PATH)


def test_an_unknown_option_of_a_group_lists_the_options_in_one_line():
    with pytest.raises(ConfigError,
                       match="Could not find 'distill/kdd'.*Available options in 'distill'") as info:
        check(["distill=kdd"], CONFIG_PATH)
    assert "\n" not in str(info.value)
