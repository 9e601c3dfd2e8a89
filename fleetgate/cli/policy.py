"""``fleetgate acl`` and ``fleetgate group``: what a group's devices may do, and which key
protection it requires."""

from __future__ import annotations

from typing import Annotated

import typer

from fleetgate.cli.common import (
    JsonFlag,
    admin_actor,
    emit,
    home_config,
    open_registry,
)

acl_app = typer.Typer(no_args_is_help=True, help="Per-group topic ACL templates (%d = device id).")
group_app = typer.Typer(no_args_is_help=True, help="Device groups' key-protection policy.")


@acl_app.command("set")
def acl_set(
    group: str,
    publish: Annotated[list[str], typer.Option(help="Topic filter a device may publish to.")],
    subscribe: Annotated[list[str], typer.Option(help="Topic filter a device may subscribe to.")],
) -> None:
    """Replace GROUP's ACL template, e.g. --publish 'devices/%d/#'; live sessions take it too."""
    open_registry(home_config()).set_acl(
        group, publish=publish, subscribe=subscribe, actor=admin_actor()
    )
    typer.echo(
        f"ACL of group {group} set: publish {publish}, subscribe {subscribe}; live sessions "
        "take it within the brokers' feed poll (a session holding what it no longer allows "
        "is closed)"
    )


@acl_app.command("show")
def acl_show(group: str, as_json: JsonFlag = False) -> None:
    """Show GROUP's ACL template (the built-in default when none is stored)."""
    from broker.acl import DEFAULT_TEMPLATE

    stored = open_registry(home_config()).acl_patterns(group)
    source = "stored" if stored else "default"
    template = stored or DEFAULT_TEMPLATE
    rows = [
        {"group": group, "action": "publish", "pattern": p, "source": source}
        for p in template.publish
    ]
    rows += [
        {"group": group, "action": "subscribe", "pattern": p, "source": source}
        for p in template.subscribe
    ]
    emit(rows, as_json)


@group_app.command("require")
def group_require(
    group: str,
    protection: Annotated[
        str, typer.Argument(help="none, tpm, smartcard or any-hardware.", show_default=False)
    ],
) -> None:
    """Require GROUP's devices to prove their key protection at enrollment and renewal."""
    from enrollment.policy import parse_requirement

    requirement = parse_requirement(protection)
    open_registry(home_config()).set_group_policy(group, requirement.value, actor=admin_actor())
    typer.echo(f"group {group} now requires key protection: {requirement}")


@group_app.command("list")
def group_list(as_json: JsonFlag = False) -> None:
    """Groups with a key-protection policy (other groups accept any key)."""
    rows = [
        {"group": p.group, "requires": p.required_protection}
        for p in open_registry(home_config()).group_policies()
    ]
    emit(rows, as_json)
