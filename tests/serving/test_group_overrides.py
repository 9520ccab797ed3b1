"""The DP group classes are built from mixins (``OverlappedSteps``, ``Fencing``,
``RequestIsolation``) and subclassed per role (``PrefillGroup``, ``DecodeGroup``): a method
named as a base's replaces it for every caller of the base. ``DecodeGroup._drop(arrival)``
once replaced ``OverlappedSteps._drop(flight)``, so rolling back a step in flight raised
``AttributeError`` and took a healthy decode group out of service."""

import inspect

from serving.core.dp_group import DPGroup
from serving.disagg.pd import DecodeGroup, PrefillGroup


def _group_classes() -> list[type]:
    found, todo = [], [DPGroup]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found + [c for c in DPGroup.__mro__[1:] if c is not object]


def test_every_override_keeps_its_base_s_parameters():
    classes = _group_classes()
    assert {DPGroup, PrefillGroup, DecodeGroup} <= set(classes)
    clashes = []
    for cls in classes:
        for name, method in vars(cls).items():
            if not inspect.isfunction(method) or name.startswith("__"):
                continue
            for base in cls.__mro__[1:]:
                replaced = vars(base).get(name)
                if inspect.isfunction(replaced):
                    mine = list(inspect.signature(method).parameters)
                    theirs = list(inspect.signature(replaced).parameters)
                    if mine != theirs:
                        clashes.append(f"{cls.__name__}.{name}{mine} replaces "
                                       f"{base.__name__}.{name}{theirs}")
                    break
    assert clashes == []
