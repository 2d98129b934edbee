"""Tests of medseg.errors.unwrapped: what a wrapper's exception hides reaches the user as one medseg error."""

from __future__ import annotations

import pytest

from medseg.errors import BundleError, InputError, unwrapped


def _wrap(cause: BaseException) -> BundleError:
    return BundleError(f"failed: {type(cause).__name__}: {cause}")


def test_a_medseg_error_hidden_in_a_wrapper_passes_as_it_is() -> None:
    hidden = InputError("scan.nii.gz", "truncated")
    with pytest.raises(InputError) as info, unwrapped(_wrap):
        try:
            raise hidden
        except InputError as exc:
            raise RuntimeError("applying transform <LoadImaged>") from exc  # what MONAI's Compose does
    assert info.value is hidden and isinstance(info.value.__cause__, RuntimeError)


def test_any_other_failure_is_wrapped_with_its_root_cause() -> None:
    with pytest.raises(BundleError, match=r"^failed: ZeroDivisionError: division by zero$") as info, unwrapped(_wrap):
        try:
            1 / 0  # noqa: B018 - the failure itself
        except ZeroDivisionError as exc:
            raise RuntimeError("wrapper") from exc
    assert isinstance(info.value.__cause__, RuntimeError)


def test_a_medseg_error_raised_directly_is_not_wrapped() -> None:
    with pytest.raises(InputError, match="bad"), unwrapped(_wrap):
        raise InputError(None, "bad")
