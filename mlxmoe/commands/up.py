"""`mlxmoe up`: create or join the cluster, get this Mac's part, serve (cluster/up.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import click

from mlxmoe.commands.options import (api_key_option, api_keys, check_bind, check_port, clean_errors, parse_size,
                                     run_server, setup_logging)


@click.command("up")
@click.argument("source", required=False)
@click.option("--join", "token", metavar="TOKEN", help="Join the cluster of the Mac that printed TOKEN (`mlxmoe token`).")
@click.option("--memory", help="Memory this Mac's node may use, e.g. 48GB (default: its memory less OS headroom).")
@click.option("--name", help="This Mac's name in the cluster (default: its host name).")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the node (and the join server) listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="The router's port (first Mac).")
@click.option("--router-host", default="127.0.0.1", show_default=True,
              help="Address the router's API listens on (first Mac). Another than loopback needs --api-key.")
@api_key_option
@click.option("--node-port", default=7420, show_default=True, type=int, help="This Mac's node's port.")
@click.option("--join-port", default=7419, show_default=True, type=int, help="The first Mac's join server's port.")
@click.option("--no-mdns", is_flag=True, help="No Bonjour (members are told of each other directly).")
@click.option("--replan", is_flag=True, help="First Mac: plan every Mac's experts afresh (moves experts between "
              "Macs; each other Mac fetches its new part when `mlxmoe up` runs there again).")
@click.option("--yes", is_flag=True, help="With --replan: do not ask.")
@click.option("-v", "--verbose", is_flag=True)
def up_cmd(source, token, memory, name, host, port, router_host, api_key, node_port, join_port, no_mdns, replan,
           yes, verbose):
    """Start this Mac's part of the cluster, creating or joining it: one command per Mac.

    \b
      mlxmoe up mlx-community/Qwen3-30B-A3B-4bit     # the first Mac: the cluster, its router, its node
      mlxmoe token                                   # (there) a join token for another Mac
      mlxmoe up --join mlxmoe-ab12cd.x...@192.168.1.20:7419#sha256:...   # each other Mac

    The first Mac makes the cluster's CA and key under the config home
    ($MLXMOE_HOME, default ~/.config/mlxmoe) when it has none, splits SOURCE
    (a bundle, a checkpoint directory, or a repo in the Hugging Face cache)
    once, and serves its own part. A Mac that joins gets a certificate (its
    key never leaves it; the CA's never leaves the first Mac), is given a set
    of experts sized to its --memory that adds what the others lack, fetches
    those files from the first Mac (resumable, sha256-checked) and serves them;
    the others keep serving. Run `mlxmoe up` again on a Mac to restart it.
    """
    from mlxmoe.cluster import up as upm
    from mlxmoe.cluster.keys import config_home

    setup_logging(verbose)
    home = config_home()
    home.mkdir(parents=True, exist_ok=True)
    state = json.loads((home / upm.STATE).read_text()) if (home / upm.STATE).exists() else {}
    mem = parse_size(memory, "--memory") if memory else default_memory()
    keys = api_keys(api_key)
    for p, h in ((node_port, host), (port, router_host)) if not token and state.get("role") != "member" else \
            ((node_port, host),):
        check_port(h, p)
    if replan and state.get("role") != "coordinator":
        raise click.UsageError("--replan is the first Mac's, once it has a plan (run `mlxmoe up SOURCE` first)")
    if token or state.get("role") == "member":
        if source:
            raise click.UsageError("a Mac that joins serves the cluster's model: give SOURCE only on the first Mac")
        coro = member(home, token, state, mem, name, host, node_port, not no_mdns)
    else:
        if not source and not state:
            raise click.UsageError("give SOURCE (a bundle, checkpoint or Hugging Face repo) on the first Mac, "
                                   "or --join TOKEN on another")
        check_bind(router_host, keys)
        if replan:
            state = clean_errors(replan_state, home, state, yes)
        coro = coordinator(home, source, state, mem, name, host, router_host, port, node_port, join_port, not no_mdns,
                           keys)
    run_server(coro, host, node_port)


def replan_state(home: Path, state: dict, yes: bool) -> dict:
    """`--replan`: show what moves, ask (unless --yes), write the new plan; the state to start from."""
    from mlxmoe.cluster.keys import load_key
    from mlxmoe.cluster.up import STATE, Coordinator, Member

    coord = Coordinator(home, Path(state["master"]), Path(state["layout"]), load_key(home / "cluster.key"), None, None)
    coord.members = [Member(**m) for m in state["members"]]
    sets, lines = coord.replan()
    click.echo("the new plan:\n  " + "\n  ".join(lines))
    if not yes and not click.confirm("serve it?", default=True):
        raise click.Abort()
    coord.apply(sets)
    return json.loads((home / STATE).read_text())


def default_memory() -> int:
    """This Mac's memory less OS headroom (plan's 75%)."""
    import psutil

    return int(psutil.virtual_memory().total * 0.75)


def advertised(host: str) -> str:
    from mlxmoe.cluster.join import default_address

    return default_address() if host in ("0.0.0.0", "") else host


async def coordinator(home: Path, source, state: dict, memory: int, name, host, router_host, port, node_port,
                      join_port, mdns: bool, api_keys: list[str]) -> None:
    from mlxmoe.cluster import tls
    from mlxmoe.cluster.api import start_router
    from mlxmoe.cluster.join import default_name, start_join
    from mlxmoe.cluster.keys import create_key, load_key
    from mlxmoe.cluster.router import Router
    from mlxmoe.children import Children
    from mlxmoe.cluster.up import Coordinator, Member, start_node_process
    from mlxmoe.cluster.worker import until_signalled
    from mlxmoe.node.trunk import TrunkFrontend
    from mlxmoe.ui import chat_page
    from mlxmoe.ui.status_page import render

    name = name or default_name()
    if not (home / "cluster.key").exists():
        create_key(home / "cluster.key")
    if not tls.Identity.in_dir(home).ca.exists():
        tls.create_ca(home)
    ident = tls.ensure_identity(home, name, tls.default_hosts(host) + [advertised(host)])
    key = load_key(home / "cluster.key")
    master = Path(state["master"]) if state.get("master") else clean_errors(ensure_master, home, source)
    layout = master.parent / "layout"
    coord = Coordinator(home, master, layout, key, None, tls.client_context(ident))
    node_url = f"https://{advertised(host)}:{node_port}"
    if state.get("members"):
        coord.members = [Member(**m) for m in state["members"]]
        coord.members[0].node_url = node_url
    else:
        print(f"planning for this Mac ({memory / 1e9:.3g} GB) ...", flush=True)
        clean_errors(coord.first, Member(name, memory, node_url))
    (home / "logs").mkdir(exist_ok=True)
    children = Children("up")
    node = start_node_process(children, home, layout, 0, host, node_port, home / "logs" / "node.log")
    router = Router(None, key, frontend_factory=lambda: TrunkFrontend.load(layout, verify=False),
                    static_peers=[mb.node_url for mb in coord.members], mdns=mdns, tls=ident, api_keys=api_keys)
    coord.router = router
    running = join = None
    try:
        running = await start_router(router, router_host, port, page=render, chat_page=chat_page.render)
        await wait_up(router, node, home / "logs" / "node.log")
        join = await start_join(home, host, join_port, name=name, routes=lambda app: app.router.add_post(
            "/enroll", coord.enroll))
        reconciling = asyncio.ensure_future(coord.reconcile())
        m = coord.layout
        held = coord.members[0].experts
        print(f"ready: {m.model_id} for {len(coord.members)} Mac(s); this Mac holds {held} of "
              f"{m.n_experts * len(m.moe_layers)} experts.\n"
              f"  chat: mlxmoe chat --url {running.url}   (OpenAI API {running.url}/v1, web chat {running.url}/chat)\n"
              f"  another Mac: run `mlxmoe token` here, then `mlxmoe up --join TOKEN` there "
              f"(join server on port {join.port})", flush=True)
        stop = asyncio.ensure_future(until_signalled())
        while not stop.done():
            await asyncio.wait([stop], timeout=1.0)
            if node.poll() is not None:
                raise click.ClickException(f"this Mac's node stopped (exit {node.returncode}); log: "
                                           f"{home / 'logs' / 'node.log'}")
    finally:
        if join is not None:
            reconciling.cancel()
            await join.stop()
        if running is not None:
            await running.stop()
        else:
            await router.stop()
        children.stop()


async def wait_up(router, node, log: Path, timeout: float = 300.0) -> None:
    """Until the router has this Mac's node up (it loads its model first)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not router.peers.live():
        if node.poll() is not None:
            raise click.ClickException(f"this Mac's node stopped at start (exit {node.returncode}); log: {log}")
        if asyncio.get_running_loop().time() > deadline:
            raise click.ClickException(f"this Mac's node did not come up in {timeout:.0f}s; log: {log}")
        await asyncio.sleep(0.5)
        await router.fleet.probe_all()


def ensure_master(home: Path, source: str) -> Path:
    """SOURCE as the master bundle (every expert): a bundle is used as it is; a checkpoint or a repo
    in the Hugging Face cache is split once into the config home; a repo id that is not there is pulled
    first (`mlxmoe pull`'s ranged reads, resumable) into the config home."""
    from mlxmoe import ASSETS
    from mlxmoe.bundle.checkpoint import CheckpointError, resolve
    from mlxmoe.bundle.manifest import FILENAME
    from mlxmoe.bundle.split import split

    if source in ("reference-moe", "reference"):  # the model that ships with mlxmoe (tests, a first try)
        source = str(ASSETS / "reference-moe")
    p = Path(source).expanduser()
    if (p / FILENAME).is_file():
        return p
    here = home / "bundles" / (p.name if p.exists() else source.replace("/", "--"))
    out = here / "master"
    if (out / FILENAME).is_file():
        return out
    if not p.exists() and source.count("/") == 1:
        try:
            resolve(source)  # in the Hugging Face cache: split it from there
        except CheckpointError:
            source = pull_source(source, here / "checkpoint")
    print(f"splitting {source} once -> {out}", flush=True)
    split(source, str(out), 1, force=True)  # split's defaults: 4-bit experts, 8-bit trunk
    return out


def pull_source(repo: str, dest: Path) -> str:
    """Every tensor of `repo` into `dest` (a checkpoint split reads), with a progress bar; resumes a pull cut short."""
    from mlxmoe.bundle.pull import pull
    from mlxmoe.progress import progress

    print(f"pulling {repo} -> {dest}", flush=True)
    with progress(None, f"pull {repo}", "bar", lazy=True) as bar:
        pull(repo, dest, progress=bar.advance, on_total=lambda n: setattr(bar, "total", n))
    return str(dest)


async def member(home: Path, token, state: dict, memory: int, name, host, node_port, mdns: bool) -> None:
    from mlxmoe.bundle.copy import node_files
    from mlxmoe.bundle.manifest import Manifest
    from mlxmoe.cluster import tls
    from mlxmoe.cluster.join import default_name, join, parse_token
    from mlxmoe.cluster.keys import load_key
    from mlxmoe.cluster.node_server import serve_node
    from mlxmoe.cluster.parts import fetch_part
    from mlxmoe.cluster.up import STATE, enroll, part_dir
    from mlxmoe.node.engine import Node
    from mlxmoe.progress import progress

    name = name or state.get("name") or default_name()
    if token:
        t = parse_token(token)
        if not (home / "cluster.key").exists():
            await asyncio.to_thread(join, t, home, name=name, hosts=[advertised(host)])
        coordinator = f"https://{'[' + t.host + ']' if ':' in t.host else t.host}:{t.port}"
        (home / STATE).write_text(json.dumps({"role": "member", "coordinator": coordinator, "name": name}))
    else:
        coordinator = state["coordinator"]
    ident = tls.ensure_identity(home, name, tls.default_hosts(host) + [advertised(host)])
    key = load_key(home / "cluster.key")
    ctx = tls.client_context(ident)
    print(f"enrolling with {coordinator} ({memory / 1e9:.3g} GB) ...", flush=True)
    ans = await enroll(coordinator, key, ctx, name, memory, node_port, None if host in ("0.0.0.0", "") else host)
    m, g = Manifest.from_dict(ans["manifest"]), int(ans["group"])
    dest = part_dir(home, m)
    names = node_files(m, [g])
    total = sum(m.files[n]["size"] for n in names)
    with progress(total, f"part of group {g} from {ans['parts']}", "bar") as p:
        await fetch_part(ans["parts"], m, names, dest, key, ctx, progress=p.advance)
    held = sum(len(m.eligible(g, l)) for l in m.moe_layers)
    print(f"ready: group {g}, {held} of {m.n_experts * len(m.moe_layers)} experts; serving", flush=True)
    await serve_node(None, key, host, node_port, advertise=mdns, factory=lambda: Node.load(str(dest), g), tls=ident)
