"""Benchmarks size themselves to the machine: they predict their peak memory and stop with what they need and
which option lowers it, instead of being killed by the OS."""

from __future__ import annotations

import json

import pytest
import torch

from kd_plugin.benchmarks import ekd
from kd_plugin.benchmarks.memory import activation_bytes_per_image, available_bytes, require
from kd_plugin.cli import main
from kd_plugin.errors import KDPluginError


def test_a_step_that_cannot_fit_stops_before_allocating_with_what_it_needs(capsys):
    code = main(["bench", "ekd", "--student", "mbf", "--batches", "1000000", "--memory-batches", "512", "--json"])
    err = capsys.readouterr().err
    assert code == 2
    assert "bench ekd: a mbf step at global batch 1000000 needs about" in err
    assert "GiB available" in err and "lower --batches or use --student tiny" in err


def test_ekd_memory_sizes_beyond_the_machine_stop_after_the_first_measurement(capsys):
    code = main(["bench", "ekd", "--batches", "", "--memory-batches", "256,10000000", "--json"])
    err = capsys.readouterr().err
    assert code == 2 and "EKD alone at global batch 10000000 needs about" in err and "lower --memory-batches" in err


def test_small_sizes_run_and_print_their_json(capsys):
    assert main(["bench", "ekd", "--batches", "16", "--memory-batches", "128", "--steps", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["student"] == "tiny" and set(result["steps"]) == {"16"} and set(result["ekd_peak_bytes"]) == {"128"}


def test_the_defaults_follow_the_device():
    assert ekd.DEFAULTS["cpu"]["student"] == "tiny" and ekd.DEFAULTS["cuda"]["student"] == "mbf"
    assert max(int(b) for b in ekd.DEFAULTS["cpu"]["batches"].split(",")) <= 512


def test_activation_estimate_and_the_stop_message():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    assert activation_bytes_per_image(net) == 2 * 4 * 112 * 112 * 4  # the conv's and the ReLU's outputs, fp32
    with pytest.raises(KDPluginError, match=r"the thing needs about .* GiB but cpu has .* GiB available .*; "
                                            r"lower --it"):
        require(10 * available_bytes("cpu"), "the thing", "cpu", "lower --it")
    require(1.0, "a byte", "cpu", "nothing")
