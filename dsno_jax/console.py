"""What the command line shows: the run's own lines, and the libraries' from WARNING on."""
import importlib.util
import logging
import os

from absl import logging as absl_logging

# Libraries whose INFO lines describe their own internals (checkpoint handlers, data set
# readers, backends): the console shows their warnings and errors unless --verbosity >= 1.
QUIET_LIBRARIES = ("orbax", "tensorstore", "tensorflow_datasets", "jax", "matplotlib")


class LibraryInfoFilter(logging.Filter):
  """Drops records below WARNING that come from files under `directories`."""

  def __init__(self, directories):
    super().__init__()
    self.directories = tuple(directories)

  def filter(self, record):
    return record.levelno >= logging.WARNING or not record.pathname.startswith(self.directories)


def library_directories(names=QUIET_LIBRARIES):
  """The installed directories of the packages `names` (found without importing them)."""
  directories = []
  for name in names:
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.submodule_search_locations:
      directories += [os.path.join(d, "") for d in spec.submodule_search_locations]
  return directories


def quiet_libraries(verbosity: int, handler=None) -> None:
  """Keeps QUIET_LIBRARIES' INFO lines off `handler` (absl's console handler) at verbosity 0."""
  if verbosity < 1:
    (handler or absl_logging.get_absl_handler()).addFilter(
        LibraryInfoFilter(library_directories()))
