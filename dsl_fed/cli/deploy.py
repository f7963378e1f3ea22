"""`dsl_fed deploy local|certs|keygen|split`: a Flower deployment (SuperLink + SuperNodes) with TLS and node
authentication.

``certs``, ``keygen`` and ``split`` prepare what real machines need (the operator's CA and SuperLink certificate,
a site's own key pair, one data folder per node); ``local`` runs the whole federation on this machine as separate
processes, with the same commands the README lists for machines.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dsl_fed.cli.arguments import int_in, seed

ISOLATION_DEFAULT = "process"  # `dsl_fed.deploy.local.deploy_local`'s


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "deploy",
        help="federated training on Flower's deployment engine: certificates, node folders, a loopback federation",
        description="Run federated training as a real Flower deployment (SuperLink + authenticated SuperNodes over "
        "TLS), or prepare one: certificates and node keys, one data folder per node.",
    )
    sub = p.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)

    local = sub.add_parser(
        "local", help="split the corpus, make keys, run SuperLink + N SuperNodes on 127.0.0.1 and the job",
        description="Split the config's corpus by speaker into N node folders, create a CA, a SuperLink "
        "certificate and N node keys, start a SuperLink (TLS, node authentication) and N SuperNodes as separate "
        "processes on 127.0.0.1, run the federated job with `flwr run` and stop everything. The server holds no "
        "audio: devel UAR is computed from the nodes' summed confusion counts.",
    )
    local.add_argument("config", type=Path, help="YAML config (see configs/quickstart.yaml)")
    local.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="config overrides")
    local.add_argument("--nodes", type=int_in(1, 256), default=3, help="SuperNodes (speaker groups), 1-256, default 3")
    local.add_argument("--resume", action="store_true", help="continue from runs/<name>/latest (same config required)")
    local.add_argument("--overwrite", action="store_true",
                       help="replace an existing run of this name (only once the new run has finished)")
    local.add_argument("--isolation", choices=("process", "subprocess"), default=ISOLATION_DEFAULT,
                       help="process: one long-lived ClientApp process per SuperNode, which imports TensorFlow and "
                       "builds the model once; subprocess: Flower's new ClientApp process for every message "
                       f"(default {ISOLATION_DEFAULT})")
    local.set_defaults(func=run_local)

    certs = sub.add_parser(
        "certs", help="CA and SuperLink certificate/key (and, on request, SuperNode key pairs)",
        description="Write ca.crt/ca.key, server.crt/server.key (valid for every --host) and server.pem (both in "
        "one file, for a TLS proxy) into DIR; with --nodes K also node_<k>/node_<k>.pub (ECDSA P-384, OpenSSH "
        "format). Sites that make their own keys (`deploy keygen`) need no --nodes.",
    )
    certs.add_argument("directory", type=Path, metavar="DIR", help="new or empty folder")
    certs.add_argument("--host", action="append", required=True,
                       help="name or IP address SuperNodes (or the operator) use to reach the SuperLink (repeatable)")
    certs.add_argument("--nodes", type=int_in(0, 100_000), default=0,
                       help="SuperNode key pairs to make here (default 0: sites run `deploy keygen`)")
    certs.set_defaults(func=run_certs)

    keygen = sub.add_parser(
        "keygen", help="a site's SuperNode key pair; prints the public key to register",
        description="Write DIR/node_key (private, mode 0600) and DIR/node_key.pub (ECDSA P-384, OpenSSH format, "
        "what `flower-supernode --auth-supernode-private-key` and `flwr supernode register` expect) and print "
        "the public key. Run it on the site; only node_key.pub leaves it. Existing files are never replaced.",
    )
    keygen.add_argument("directory", type=Path, metavar="DIR", help="the site's folder (made if missing)")
    keygen.set_defaults(func=run_keygen)

    split = sub.add_parser(
        "split", help="one folder per node holding only its speakers' audio and its own manifest.csv",
        description="Copy each node's speakers (train groups as data.shards=N makes them; devel/test speakers "
        "dealt round-robin) into OUTDIR/node_<k>/ with its own manifest.csv: the node's data-path.",
    )
    split.add_argument("manifest", type=Path, metavar="MANIFEST", help="manifest CSV or folder corpus")
    split.add_argument("outdir", type=Path, metavar="OUTDIR", help="new or empty folder")
    split.add_argument("--nodes", type=int_in(1, 100_000), required=True, help="number of node folders")
    split.add_argument("--seed", type=seed, default=0, help="speaker grouping seed (= data.seed), default 0")
    split.set_defaults(func=run_split)


def run_local(args: argparse.Namespace) -> int:
    import sys

    from dsl_fed.cli.federated import summary
    from dsl_fed.deploy.local import deploy_local

    run_dir = deploy_local(args.config, args.overrides, nodes=args.nodes, resume=args.resume,
                           echo=lambda line: print(line, file=sys.stderr, flush=True), overwrite=args.overwrite,
                           isolation=args.isolation)
    print(summary(run_dir))
    return 0


def run_certs(args: argparse.Namespace) -> int:
    from dsl_fed.deploy.certs import write_certificates

    folder = write_certificates(args.directory, args.host, args.nodes)
    nodes = f", {args.nodes} node key pair(s) node_<k>[.pub]" if args.nodes else ""
    print(f"{folder}: ca.crt, server.crt/.key/.pem for {', '.join(args.host)}{nodes}")
    return 0


def run_keygen(args: argparse.Namespace) -> int:
    import sys

    from dsl_fed.deploy.certs import write_node_key

    private, public = write_node_key(args.directory)
    print(f"{private} (private, 0600; stays here), {private}.pub: register it with "
          "`flwr supernode register node_key.pub <connection>`", file=sys.stderr)
    print(public)
    return 0


def run_split(args: argparse.Namespace) -> int:
    from dsl_fed.deploy.split import split_corpus

    folders = split_corpus(args.manifest, args.outdir, args.nodes, args.seed)
    for folder in folders:
        print(f"{folder}: {sum(1 for _ in folder.rglob('*') if _.is_file()) - 1} audio files + manifest.csv")
    return 0
