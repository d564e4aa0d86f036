"""The paper presets at the datasets' published sizes (label-only records, no images): under the
default cache policy every stage's plan fits a 64 GB host, and the policy's choices add up."""

import pytest

from drkeras.experiment import EXPERIMENTS, load_experiment
from drkeras.plan import plan_preset, write_published_records

HOST_GB = 64


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    return write_published_records(tmp_path_factory.mktemp("published"))


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_paper_preset_fits_64_gb_of_host_ram(name, published, tmp_path):
    experiment = load_experiment(name)
    plan = plan_preset(
        experiment,
        "paper",
        data_root=published,
        out_dir=tmp_path,
        host_ram_gb=HOST_GB,
        networks=False,  # host RAM only: the networks live on the accelerators
    )
    assert plan["stages"], "no stage declared"
    assert plan["machine"]["cache_budget_gb"] == HOST_GB / 2
    for row in plan["stages"]:
        assert row["host_ram_gb"] <= HOST_GB, row
        assert row["host_ram_parts_gb"]["memory_caches"] <= HOST_GB / 2, row
    assert plan["peak_host_ram_gb"] == max(row["host_ram_gb"] for row in plan["stages"])
    # the same preset with every cache forced into memory: what auto avoided
    forced = plan_preset(
        experiment,
        "paper",
        data_root=published,
        overrides=["data.cache=memory"],
        out_dir=tmp_path / "memory",
        host_ram_gb=HOST_GB,
        networks=False,
    )
    assert forced["peak_host_ram_gb"] >= plan["peak_host_ram_gb"]
