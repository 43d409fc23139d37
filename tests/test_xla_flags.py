"""dsno_jax.xla_flags: which XLA:CPU flags are added to XLA_FLAGS, and when not."""
from dsno_jax import xla_flags

FLAG = xla_flags.CPU_FLAGS[0]
NAME = FLAG.split("=")[0]


def test_appends_to_the_users_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert xla_flags.add_cpu_flags(env, "0.10.2") == [FLAG]
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
  assert xla_flags.add_cpu_flags(env, "0.10.2") == []  # once only
  assert env["XLA_FLAGS"].count(NAME) == 1


def test_sets_the_flags_when_there_were_none():
  env = {}
  assert xla_flags.add_cpu_flags(env, "0.10.0") == [FLAG]
  assert env == {"XLA_FLAGS": FLAG}


def test_the_users_own_value_wins():
  env = {"XLA_FLAGS": f"{NAME}=dot"}
  assert xla_flags.add_cpu_flags(env, "0.10.2") == []
  assert env["XLA_FLAGS"] == f"{NAME}=dot"


def test_opt_out_and_unverified_jaxlib_leave_the_flags_alone():
  for env, version in (({xla_flags.OPT_OUT: "1"}, "0.10.2"), ({}, "0.11.2"), ({}, "0.4.30")):
    before = dict(env)
    assert xla_flags.add_cpu_flags(env, version) == []
    assert env == before
  env = {xla_flags.OPT_OUT: "0"}  # "0" does not opt out
  assert xla_flags.add_cpu_flags(env, "0.10.2") == [FLAG]


def test_ynn_dots_follow_the_last_setting_of_the_flag():
  assert xla_flags.ynn_dot_enabled({"XLA_FLAGS": f"{NAME}=reduce {NAME}=dot,reduce"})
  assert not xla_flags.ynn_dot_enabled({"XLA_FLAGS": f"{NAME}=dot {NAME}=reduce"})
  assert not xla_flags.ynn_dot_enabled({})
