"""What the launcher of this process was asked for: machines, processes, CPU or not.

Read from the `accelerate launch` command line of the parent process (with its --config_file), else
torchrun's environment. A process group smaller than this is a launch that did not
form (diffold/distributed.py). Nothing here starts a process group.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CPU_HINT = ("`--cpu` or a config with distributed_type NO starts one plain process per launch that never "
            "joins a process group (accelerate #2741): on CPUs use --config_file accelerate_configs/cpu_ddp.yaml "
            "(plus --num_machines/--machine_rank/--main_process_ip/--main_process_port on several machines), "
            "on GPUs multi_gpu.yaml; ./launch_train.sh picks the config for you")


@dataclass(frozen=True)
class LaunchRequest:
    """Processes in total over all machines, as the launcher was asked."""

    launcher: str                 # "accelerate launch" | "torchrun"
    machines: int
    processes: int
    use_cpu: bool = False
    config: str | None = None     # accelerate config file
    launcher_args: tuple[str, ...] | None = None  # accelerate launch arguments before the script
    script: str = "train_full.py"  # the training script as the launcher was given it
    hint: str = "the launched processes did not join one process group"

    def describe(self) -> str:
        cfg = f" (config {self.config})" if self.config else ""
        return f"{self.launcher}{cfg} asked for {self.machines} machine(s) / {self.processes} process(es)"


def _parent_cmdline() -> list[str] | None:
    try:
        import psutil

        return psutil.Process(os.getppid()).cmdline()
    except Exception:  # psutil missing, parent gone, access denied: the launch is judged by its environment
        return None


def accelerate_launch_argv(cmdline: list[str] | None) -> list[str] | None:
    """The arguments after `accelerate launch` (or `python -m accelerate.commands.launch`), else None."""
    for i, tok in enumerate(cmdline or []):
        base = os.path.basename(tok)
        if tok == "accelerate.commands.launch" and i > 0 and cmdline[i - 1] == "-m":
            return cmdline[i + 1:]
        if base == "accelerate" and i + 1 < len(cmdline) and cmdline[i + 1] == "launch":
            return cmdline[i + 2:]
        if base == "accelerate-launch":
            return cmdline[i + 1:]
    return None


def from_accelerate_argv(argv: list[str]) -> LaunchRequest | None:
    """Resolve machines / processes / cpu as accelerate's launcher does: flags win over the config file."""
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        args = launch_command_parser().parse_args(argv)
    except SystemExit:  # not parseable by this accelerate version: no opinion
        return None
    path = args.config_file or (default_config_file if os.path.isfile(default_config_file) and not args.cpu else None)
    cfg = None
    if path:
        try:
            cfg = load_config_from_file(path)
        except Exception:  # an unreadable config fails the launcher itself, before we run
            cfg = None
    machines = args.num_machines or getattr(cfg, "num_machines", None) or 1
    processes = args.num_processes or getattr(cfg, "num_processes", None) or 1
    dist = str(getattr(cfg, "distributed_type", "NO")).split(".")[-1]
    multi = args.multi_gpu or args.use_fsdp or args.use_deepspeed or args.use_megatron_lm or dist != "NO"
    simple = bool(args.cpu) or not multi  # accelerate's simple launcher: one process per launch
    script = args.training_script
    head = tuple(argv[:argv.index(script)]) if script in argv else None
    return LaunchRequest("accelerate launch", int(machines), int(processes),
                         use_cpu=bool(args.cpu or getattr(cfg, "use_cpu", False)),
                         config=str(Path(path)) if path else None, launcher_args=head, script=script,
                         hint=CPU_HINT if simple else "the launched processes did not join one process group")


def launch_request() -> LaunchRequest | None:
    """What this process's launcher was asked for (None: a plain single-process start)."""
    argv = accelerate_launch_argv(_parent_cmdline())
    if argv is not None:
        req = from_accelerate_argv(argv)
        if req is not None:
            return req
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env or int(env.get("WORLD_SIZE", "1")) > 1:
        return LaunchRequest("torchrun", int(env.get("GROUP_WORLD_SIZE", "1")), int(env.get("WORLD_SIZE", "1")))
    return None
