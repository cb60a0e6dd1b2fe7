"""A quiet console: library noise filtered, real warnings and arbor's own lines kept."""

import logging
import warnings

from arbor.stages.common import quiet_libraries


def test_library_noise_is_filtered_and_real_warnings_are_not(caplog):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.",
                      UserWarning, stacklevel=1)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning, stacklevel=1)
        warnings.warn("a real problem", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["a real problem"]
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("💡 Tip: try a cloud product")
        logging.getLogger("lightning.pytorch.utilities.rank_zero").warning("a real lightning warning")
        logging.getLogger("arbor").info("search: done")
    assert [r.getMessage() for r in caplog.records] == ["a real lightning warning", "search: done"]


def test_lightning_banner_stays_quiet_after_lightning_is_imported(caplog):
    quiet_libraries()
    logging.getLogger("lightning.pytorch").setLevel(logging.INFO)  # what `import lightning.pytorch` does
    with caplog.at_level(logging.INFO):
        logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: False, used: False")
    assert caplog.records == []
