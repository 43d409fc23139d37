"""`python -m dsno_jax.models --config=configs/X.py`: parameter tables and totals, shapes only."""
from absl import app, flags
import flax
from clu import parameter_overview
from ml_collections import config_flags

from dsno_jax.models import build

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.")
flags.DEFINE_integer("max_lines", 60, "Rows of each table (0 = all).")
flags.mark_flags_as_required(["config"])


def overview(config, max_lines=None) -> str:
  """Tables of the teacher and the student parameters, computed with jax.eval_shape."""
  out = []
  totals = {}
  for role, init in (("teacher", build.init_teacher), ("student", build.init_student)):
    shapes = build.param_shapes(init, config)
    table = parameter_overview.get_parameter_overview(shapes, include_stats=False,
                                                      max_lines=max_lines)
    out.append(f"== {role} ==\n{table}")
    totals[role] = build.count_params(shapes)
    if role == "student":
      flat = flax.traverse_util.flatten_dict(shapes)
      totals["time_conv"] = build.count_params(
          [v for p, v in flat.items() if build.is_time_conv_path(p)])
  out.append(f"teacher parameters: {totals['teacher']:,}\n"
             f"student parameters: {totals['student']:,} "
             f"(of which TimeConv: {totals['time_conv']:,})")
  return "\n".join(out)


def main(argv):
  del argv
  print(overview(FLAGS.config, FLAGS.max_lines or None))


if __name__ == "__main__":
  app.run(main)
