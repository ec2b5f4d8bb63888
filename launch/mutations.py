"""The mutations of launch/mutation_check.py: each a few exact text replacements in one file, and
the tests that must catch it. Add one here for each new guarantee (docs/mutations.md has the
table of what catches each)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (exact old text, new text)
    tests: tuple[str, ...]  # pytest node ids that should catch it


def _eq(kind: str) -> str:
    """Node id of a 5-step equivalence case at N = 2 (mlp, float64, SGD; ``kind`` params or trainer)."""
    return f"tests/test_equivalence.py::test_parameters_after_five_steps_equal_single_process[2-mlp-float64-sgd-{kind}]"


CKPT = "tests/test_checkpoint.py::"
RECIPE = "tests/test_check_recipe.py::"
RESILIENCE = "tests/test_resilience.py::"
AGREE = "tests/test_agree.py::"
RAY = "tests/test_ray.py::test_killed_and_restarted_ray_run_equals_one_process"
SHARDING = "tests/test_sharding.py::"
FSDP = "tests/test_fsdp_scratch.py::"
STRATEGY_TRAIN = "tests/test_strategy_train.py::"
SHARDED = "tests/test_sharded_checkpoint.py::"
RESHARD = "tests/test_resharding.py::"
CHECK_STRATEGY = "tests/test_check_strategy.py::"
WHOLE_RUNS = ("tests/test_train.py::test_whole_run_is_world_size_invariant",
              "tests/test_accumulation.py::test_whole_run_with_accumulation_equals_single_process")

MUTATIONS = (
    Mutation(
        "resume ignores the checkpoint (still logs 'resuming from')", "ddp_demo/resilience/resume.py",
        (('        model.load_state_dict(state["model"])\n        optimizer.load_state_dict(state["optimizer"])\n',
          "        pass\n"), ('    checkpoint.set_rng_state(state["rng"])\n', ""),
         ('    return state["step"], state["logs"]\n', "    return 0, []\n")),
        (CKPT + "test_stopped_and_resumed_run_is_bit_identical",
         CKPT + "test_the_resumed_result_depends_on_the_checkpoint",
         CKPT + "test_resume_path_takes_that_checkpoint", RESILIENCE + "test_killed_run_resumes_bit_identical"),
    ),
    Mutation(
        "every rank gets the whole global batch", "ddp_demo/core/data.py",
        (("num_replicas=ctx.world_size, rank=ctx.rank,", "num_replicas=1, rank=0,"),
         ("batch_size=global_batch // ctx.world_size,", "batch_size=global_batch,")),
        (*WHOLE_RUNS, RESILIENCE + "test_every_sample_once_per_epoch",
         "tests/test_data.py::test_each_step_sees_the_same_samples_whatever_the_world_size"),
    ),
    Mutation(
        "the trainer skips the DDP wrap", "ddp_demo/parallel/strategy.py",  # where --strategy ddp wraps (issue 21)
        (('        DDP(module, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)\n',
          "        module\n"),),
        (_eq("trainer"), WHOLE_RUNS[0]),
    ),
    Mutation(
        "the loss is summed, not averaged", "ddp_demo/core/loop.py",
        (("    return F.mse_loss if task.num_classes == 0 else F.cross_entropy\n",
          '    return (lambda out, y: F.mse_loss(out, y, reduction="sum")) if task.num_classes == 0 else \\\n'
          '        (lambda out, y: F.cross_entropy(out, y, reduction="sum"))\n'),),
        ("tests/test_equivalence.py::test_gradients_equal_single_process[2-mlp-float64]", _eq("params"),
         _eq("trainer"), WHOLE_RUNS[0]),
    ),
    Mutation(
        "no store prefix per restart attempt", "ddp_demo/core/dist.py",
        (("    attempt = env.restart_count if env.attempt_prefix else 0\n", "    attempt = 0\n"),),
        ("tests/test_root_causes.py::test_a_restarted_attempt_does_not_see_the_dead_attempts_keys",),
    ),
    Mutation(
        "teardown in the old order (destroy the group, then collect)", "ddp_demo/core/dist.py",
        (("    gc.collect()\n    dist.destroy_process_group()\n    gc.collect()\n",
          "    dist.destroy_process_group()\n    gc.collect()\n"),),
        ("tests/test_root_causes.py::test_the_ddp_model_is_freed_before_the_process_group_is_destroyed",),
    ),
    Mutation(
        "teardown without collecting (destroy_process_group alone)", "ddp_demo/core/dist.py",
        (("    gc.collect()\n    dist.destroy_process_group()\n    gc.collect()\n",
          "    dist.destroy_process_group()\n"),),
        ("tests/test_root_causes.py::test_the_ddp_model_is_freed_before_the_process_group_is_destroyed",),
    ),
    Mutation(
        "the sampler is never told the epoch (no set_epoch)", "ddp_demo/core/loop.py",
        (("        loader.sampler.set_epoch(epoch)", "        pass"),),
        ("tests/test_data.py::test_each_epoch_sees_distinct_samples_and_a_new_order",),
    ),
    Mutation(
        "the checksum is not verified", "ddp_demo/resilience/checkpoint.py",
        (("    if hashlib.sha256(data).hexdigest() != sum_file.read_text().strip():\n", "    if False:\n"),),
        (CKPT + "test_checksum_mismatch_and_missing_checksum_are_refused",
         CKPT + "test_damaged_newest_checkpoints_are_skipped",
         RESILIENCE + "test_damaged_newest_checkpoint_is_reported_once_and_skipped"),
    ),
    Mutation(
        "a checkpoint without its .sha256 is trusted", "ddp_demo/resilience/checkpoint.py",
        (('        raise ValueError(f"{path.name} has no checksum file (its writer was interrupted)")\n',
          "        return torch.load(io.BytesIO(data), weights_only=True)\n"),),
        (CKPT + "test_checksum_mismatch_and_missing_checksum_are_refused",
         CKPT + "test_damaged_newest_checkpoints_are_skipped"),
    ),
    Mutation(
        "resume restores the weights but not the optimizer state", "ddp_demo/resilience/resume.py",
        (('        optimizer.load_state_dict(state["optimizer"])\n', ""),),
        (CKPT + "test_stopped_and_resumed_run_is_bit_identical",),
    ),
    Mutation(
        "a checkpoint from another setup is accepted", "ddp_demo/resilience/checkpoint.py",
        (("        if saved.get(key) != config.get(key):\n", "        if False:\n"),),
        (CKPT + "test_checkpoint_from_another_setup_is_refused",),
    ),
    Mutation(
        "--keep-last prunes nothing", "ddp_demo/resilience/checkpoint.py",
        (("    for old in checkpoints(directory)[:-keep_last]:\n", "    for old in []:\n"),),
        (CKPT + "test_keep_last_prunes_to_the_newest", SHARDED + "test_keep_last_prunes_directories"),
    ),
    Mutation(
        "a sharded resume ignores the checkpoint's tensors", "ddp_demo/resilience/resume.py",
        (("            sharded.load(found.path, module, optimizer, found.state)\n", "            pass\n"),),
        (SHARDED + "test_stopped_and_resumed_is_bit_identical",
         RESHARD + "test_resumed_at_another_size_or_strategy_equals_one_process"),
    ),
    Mutation(
        "zero's optimizer state is not loaded from a sharded checkpoint", "ddp_demo/parallel/state_dict.py",
        (("                optimizer.optim.state[p] = {k: v.to(p.device)", "                {k: v.to(p.device)"),),
        (RESHARD + "test_resumed_at_another_size_or_strategy_equals_one_process[fsdp2-zero2]",),
    ),
    Mutation(
        "a sharded checkpoint is written in place (no rename as the commit point)", "ddp_demo/resilience/sharded.py",
        (("    tmp = final.with_name(final.name + PARTIAL)\n", "    tmp = final\n"),),
        (SHARDED + "test_a_writer_killed_mid_save_leaves_no_checkpoint",),
    ),
    Mutation(
        "a shard's checksum is not verified", "ddp_demo/resilience/sharded.py",
        (("        if _sha256(path / name) != digest:\n", "        if False:\n"),),
        (SHARDED + "test_bad_checkpoint_is_one_line_and_nothing_is_overwritten[truncated-shard]",),
    ),
    Mutation(
        "a missing shard is not named", "ddp_demo/resilience/sharded.py",
        (("        if not (path / name).is_file():\n", "        if False:\n"),),
        (SHARDED + "test_bad_checkpoint_is_one_line_and_nothing_is_overwritten[missing-shard]",),
    ),
    Mutation(
        "a checkpoint of a newer format is read", "ddp_demo/resilience/sharded.py",
        (('    if manifest.get("format", 0) > FORMAT:\n', "    if False:\n"),),
        (SHARDED + "test_bad_checkpoint_is_one_line_and_nothing_is_overwritten[newer-format]",
         SHARDED + "test_newer_format_is_not_skipped_under_resume_auto"),
    ),
    Mutation(
        "a newer format is skipped under --resume auto", "ddp_demo/resilience/checkpoint.py",
        (("        except sharded.NewerFormat as e:", "        except ZeroDivisionError as e:"),),
        (SHARDED + "test_newer_format_is_not_skipped_under_resume_auto",),
    ),
    Mutation(
        "another model's sharded checkpoint is not refused before reading", "ddp_demo/resilience/sharded.py",
        (("    check_model(path, reader.read_metadata().state_dict_metadata, module)\n", ""),),
        (SHARDED + "test_bad_checkpoint_is_one_line_and_nothing_is_overwritten[another-model]",),
    ),
    Mutation(
        "DCP's .metadata is read with plain pickle", "ddp_demo/resilience/sharded.py",
        (("metadata = _MetadataUnpickler(f).load()\n", "metadata = pickle.load(f)\n"),),
        (SHARDED + "test_a_checkpoint_cannot_run_code[.metadata]",),
    ),
    Mutation(
        "the offline conversion drops the optimizer state", "ddp_demo/parallel/state_dict.py",
        (("    optim_state = {index[n]: s for n, s in state[\"optim\"][\"state\"].items()}\n",
          "    optim_state = {}\n"),),
        (SHARDED + "test_conversion_both_ways_keeps_every_tensor",),
    ),
    Mutation(
        "checkpoints are read without weights_only", "ddp_demo/resilience/checkpoint.py",
        (("    return torch.load(io.BytesIO(data), weights_only=True)\n",
          "    return torch.load(io.BytesIO(data), weights_only=False)\n"),),
        (CKPT + "test_checkpoint_cannot_run_code",),
    ),
    Mutation(
        "the loss and stop flag no longer ride in the gradient all-reduce", "ddp_demo/core/agree.py",
        (("        if bucket.index() == 0 and self.losses:\n", "        if False:\n"),),
        (AGREE + "test_the_trainer_makes_no_collective_beyond_the_bare_loops",
         AGREE + "test_with_scratch_ddp_too_the_pair_rides_in_its_buckets"),
    ),
    Mutation(
        "ScratchDDP ignores a registered comm hook", "ddp_demo/parallel/ddp.py",
        (("        if self._comm_hook is not None:  # Reducer::run_comm_hook",
          "        if False:  # Reducer::run_comm_hook"),),
        (AGREE + "test_with_scratch_ddp_too_the_pair_rides_in_its_buckets",),
    ),
    Mutation(
        "ScratchFSDP's reduce-scatter averages nothing (each rank keeps its own chunk)", "ddp_demo/parallel/fsdp.py",
        (("            dist.reduce_scatter_single(out, grads.view(-1), op=op, group=self.fsdp.group)\n",
          "            out.copy_(grads[rank])\n"),),
        (FSDP + "test_equal_to_fully_shard_bit_for_bit[2-mlp-float64]",),
    ),
    Mutation(
        "ScratchFSDP deals the chunks in reverse rank order (not FSDP2's rule)", "ddp_demo/parallel/fsdp.py",
        (("    start = min(rank * c, rows)\n", "    start = min((world_size - 1 - rank) * c, rows)\n"),),
        (FSDP + "test_equal_to_fully_shard_bit_for_bit[2-mlp-float32]",
         FSDP + "test_chunks_follow_fsdp2_rule_and_tile_the_rows",
         "tests/test_explain.py::test_explain_shards_shows_each_ranks_rows_and_the_step_from_real_hooks"),
    ),
    Mutation(
        "ScratchFSDP skips the all-gather before a block's backward", "ddp_demo/parallel/fsdp.py",
        (("        elif self.fsdp.gather_in_backward:\n", "        elif False:\n"),),
        (FSDP + "test_equal_to_fully_shard_bit_for_bit[2-mlp-float32]",),
    ),
    Mutation(
        "ScratchFSDP keeps every block whole after its forward", "ddp_demo/parallel/fsdp.py",
        (("        if self.fsdp.reshard_after_forward:\n", "        if False:\n"),),
        (FSDP + "test_outside_its_forward_and_backward_a_block_holds_only_its_shard",),
    ),
    Mutation(
        "ScratchFSDP divides float64 gradients once, after the sum (not FSDP2's factors)", "ddp_demo/parallel/fsdp.py",
        (("    return float(before), world_size / before, dist.ReduceOp.SUM\n",
          "    return 1.0, float(world_size), dist.ReduceOp.SUM\n"),),
        (FSDP + "test_divide_factors_are_fsdp2s", FSDP + "test_equal_to_fully_shard_bit_for_bit[3-mlp-float64]"),
    ),
    Mutation(
        "examples/fsdp.py shards nothing", "examples/fsdp.py",
        (("        fully_shard(block)  #", "        (block)  #"),),
        ("tests/test_examples.py::test_fsdp_matches_single_process",),
    ),
    Mutation(
        "silent ranks exit without waiting for the reporting rank", "ddp_demo/core/dist.py",
        (("            store.wait([key], timedelta(seconds=wait_s))\n", "            pass\n"),),
        ("tests/test_bad_input.py::test_the_reporting_rank_is_not_stopped_before_it_reports",),
    ),
    Mutation(
        "the check takes its learning rate from the proofs again (and loads the trainer)", "ddp_demo/check/options.py",
        (("from ddp_demo.core.config import OPTIMIZERS, PROOF_LR\n",
          "from ddp_demo.core.config import OPTIMIZERS\nfrom ddp_demo.proof.equivalence import LR as PROOF_LR\n"),),
        ("tests/test_layout.py::test_the_check_loads_no_trainer_doctor_resilience_or_proof",),
    ),
    Mutation(
        "node 0's agent hosts the store even when RDZV_EXTERNAL=1 puts it on a host of its own", "launch/multinode.sh",
        (('is_host=$([ "$NODE_RANK" = 0 ] && [ "$RDZV_EXTERNAL" = 0 ] && echo 1 || echo 0)',
          'is_host=$([ "$NODE_RANK" = 0 ] && echo 1 || echo 0)'),),
        ("tests/test_compose.py::test_each_service_launches_torchrun_as_multinode_sh_says[store-alone-node0]",),
    ),
    Mutation(
        "fsdp's reduce-scatter reduces nothing (the control's, always)", "ddp_demo/parallel/strategy.py",
        (("    if not cfg.reduce_grads:\n        for unit in module.modules():",
          "    if True:\n        for unit in module.modules():"),),
        (SHARDING + "test_gradient_shards_equal_single_process[2-fsdp-mlp-float64]",),
    ),
    Mutation(
        "fsdp leaves a 0-dim parameter's gradient unaveraged", "ddp_demo/parallel/strategy.py",
        (("        if self.syncing and self.reduce:", "        if False:"),),
        (SHARDING + "test_gradient_shards_equal_single_process[2-fsdp-multiply-float64]",),
    ),
    Mutation(
        "zero keeps the plain optimizer (every rank holds all the state)", "ddp_demo/parallel/strategy.py",
        (('    if cfg.name == "zero":\n', "    if False:\n"),),
        (SHARDING + "test_held_bytes_exact[2-zero-adam]",
         SHARDING + "test_fsdp_holds_about_one_nth_and_zero_shrinks_optimizer_state_only[2]"),
    ),
    Mutation(
        "fsdp's policy ignores the reduce dtype (reduces in the parameters' own)", "ddp_demo/parallel/strategy.py",
        (("        if self.reduce_dtype is None:\n            return base\n", "        return base\n"),),
        (CHECK_STRATEGY + "test_lower_reduce_dtype_is_named_with_its_measured_effect",
         CHECK_STRATEGY + "test_reduce_dtype_goes_to_fsdp_only_and_into_its_policy"),
    ),
    Mutation(
        "the check's reduce-dtype baseline reduces in the lower dtype too", "ddp_demo/check/reduce_dtype.py",
        (("dataclasses.replace(p, reduce_dtype=None)", "dataclasses.replace(p)"),),
        (CHECK_STRATEGY + "test_lower_reduce_dtype_is_named_with_its_measured_effect",),
    ),
    Mutation(
        "accumulation averages every micro-batch (grad_sync never turns the reduction off)",
        "ddp_demo/parallel/strategy.py",
        (("            self.set_grad_sync(False)\n", "            self.set_grad_sync(True)\n"),),
        (SHARDING + "test_accumulation_averages_only_after_the_last_micro_batch[2-zero-mlp]",
         SHARDING + "test_accumulation_averages_only_after_the_last_micro_batch[2-fsdp-mlp]"),
    ),
    Mutation(
        "fsdp's block rule finds no blocks (the root alone is sharded)", "ddp_demo/parallel/strategy.py",
        (("    return [b for b in found if all(owners[id(p)] == 1 for p in b.parameters())]", "    return []"),),
        (SHARDING + "test_fsdp_shards_each_block_containers_opened_tied_blocks_left_to_the_root",),
    ),
    Mutation(
        "fsdp's full state dict is rank 0's own shards", "ddp_demo/parallel/strategy.py",
        (('    if wrapped.strategy == "fsdp" and ctx.distributed:\n', "    if False:\n"),),
        (SHARDING + "test_parameters_state_and_full_state_dict_after_five_steps[2-fsdp-mlp-float64-sgd]",),
    ),
    Mutation(
        "the trainer ignores --strategy (every run is ddp)", "ddp_demo/parallel/trainer_wrap.py",
        (("    scfg = StrategyConfig(cfg.strategy,", '    scfg = StrategyConfig("ddp",'),),
        (STRATEGY_TRAIN + "test_control_without_gradient_reduction_misses[zero_nosync]",
         STRATEGY_TRAIN + "test_control_without_gradient_reduction_misses[fsdp_nosync]"),
    ),
    Mutation(
        "the trainer's fsdp final.pt is rank 0's state_dict of shards, not the gathered one", "ddp_demo/train.py",
        (("        state = full if wrapped.full_state else ", "        state = "),),
        (STRATEGY_TRAIN + "test_whole_run_equals_one_process[fsdp2]",),
    ),
    Mutation(
        "the trainer's --skip-grad-sync does not reach the strategy", "ddp_demo/parallel/trainer_wrap.py",
        (("reduce_grads=not cfg.skip_grad_sync", "reduce_grads=True"),),
        (STRATEGY_TRAIN + "test_control_without_gradient_reduction_misses[fsdp_nosync]",),
    ),
    Mutation(
        "--strategy zero/fsdp accept flags they do not support (checkpoints, fp16)",
        "ddp_demo/core/config.py",
        (("        self.check_strategy()\n", "        pass\n"),),
        (STRATEGY_TRAIN + "test_refused_in_one_line[zero-file-checkpoints]",
         STRATEGY_TRAIN + "test_refused_in_one_line[fsdp-fp16]"),
    ),
    Mutation(
        "the check does not name buffers left per rank under fsdp", "ddp_demo/check/diagnose.py",
        (("    names = sorted({n for w in v.worlds for r in (w.ranks or []) for n in r.get(\"buffers_per_rank\", [])})",
          "    names = []"),),
        ("tests/test_check_strategy.py::test_batchnorm_under_fsdp_is_buffers_per_rank_and_conversion_fixes_it",),
    ),
    Mutation(
        "--strategy fsdp ignores --ddp scratch (fully_shard runs instead of ScratchFSDP)",
        "ddp_demo/parallel/strategy.py",
        (('    if cfg.name == "fsdp" and cfg.ddp_impl == "scratch":\n', "    if False:\n"),),
        (FSDP + "test_trainer_scratch_fsdp_equals_fully_shard_and_one_process",),
    ),
    Mutation(
        "buffers that drift apart under fsdp go unnamed", "ddp_demo/parallel/holdings.py",
        (("if not all_ranks_equal(b.detach(), ctx)]", "if False]"),),
        (SHARDING + "test_batchnorm_under_fsdp_drifts_per_rank_and_is_named[2]",),
    ),
    Mutation(
        "the doctor accepts a store no node hosts on this training node", "ddp_demo/doctor/checks.py",
        (("    if _is_loopback(addr) or _own_address(addr) is None:\n", "    if False:\n"),),
        ("tests/test_doctor.py::test_a_store_no_node_hosts_must_not_run_on_this_training_node",),
    ),
    Mutation(
        "an injected fault strikes the first attempt whatever attempt it names", "ddp_demo/resilience/faults.py",
        (("        self.fault = fault if fault and fault[3] == restart_count else None\n",
          "        self.fault = fault if fault and restart_count == 0 else None\n"),),
        ("tests/test_rendezvous.py::test_a_fault_strikes_in_the_attempt_it_names[1-True]",),
    ),
    Mutation(
        "the rendezvous store dies on SIGTERM instead of saying it stopped", "ddp_demo/rendezvous.py",
        (("STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}", "STOP_SIGNALS = {signal.SIGINT}"),),
        ("tests/test_rendezvous.py::test_the_store_serves_until_sigterm_then_says_it_stopped",),
    ),
    Mutation(
        "Ray's restarted workers count as a first attempt (the fault strikes again)", "ddp_demo/train_ray.py",
        (("        self.starts[rank] = self.starts.get(rank, -1) + 1\n", "        self.starts[rank] = 0\n"),),
        (RAY,),
    ),
    Mutation(
        "the Ray launcher skips the DDP wrap", "ddp_demo/train_ray.py",
        (("        return Wrapped(train.ddp_wrap(model, ctx, cfg.ddp), optimizer)\n",
          "        return Wrapped(model, optimizer)\n"),),
        (RAY,),
    ),
    Mutation(
        "plain python trains on a thread per core again (issue 26: 3x slower)", "ddp_demo/core/env.py",
        (('    return LaunchEnv(threads=None if "OMP_NUM_THREADS" in env else PLAIN_PYTHON_THREADS)\n',
          "    return LaunchEnv()\n"),),
        ("tests/test_launch_env.py::test_no_launcher_is_one_process_on_one_thread",),
    ),
    Mutation(
        "bad input is not left in torchrun's error file (its report shows <N/A>)", "ddp_demo/core/env.py",
        (("    if env.error_file is None:\n        return\n", "    return\n"),),
        ("tests/test_launch_env.py::test_an_error_is_left_where_torchruns_report_shows_it",),
    ),
    Mutation(
        "compare says PASS whatever the difference", "ddp_demo/compare.py",
        (("            if largest > tol:\n", "            if False:\n"),
         ("            if largest < CONTROL_MARGIN * tol:\n", "            if False:\n")),
        ("tests/test_compare.py::test_negative_control_the_verdict_fails",),
    ),
    Mutation(
        "verify --strategies drops zero and fsdp (only DDP proven)", "ddp_demo/verify.py",
        (('    chosen = tuple(s for s in strategies if s != "ddp")\n', '    chosen = ()\n'),),
        ("tests/test_verify_report.py::test_verify_runs_the_sharded_proof_and_reports_it_like_ddp",),
    ),
    Mutation(
        "the pytest helper's message starts with a newline again (an empty short summary)", "ddp_demo/testing.py",
        (('        raise AssertionError("\\n".join([verdict_lines(verdict)[0], "", text(verdict)]))\n',
          '        raise AssertionError("\\n" + text(verdict))\n'),),
        ("tests/test_check.py::test_helper_failure_message_is_the_report",),
    ),
    # issue 24: the check runs the user's whole step, names its bugs from what happened, never hangs
    Mutation(
        "the check ignores the recipe's scheduler", "ddp_demo/check/engine.py",
        (("    scheduler = recipe.scheduler(opt) if recipe.scheduler else None\n", "    scheduler = None\n"),),
        (RECIPE + "test_the_recipe_is_what_ran",),
    ),
    Mutation(
        "one process accumulates K micro-batches too (an undivided loss then matches)", "ddp_demo/check/engine.py",
        (("make(part.model.parameters()), k=1)", "make(part.model.parameters()), k=part.recipe.accumulate)"),),
        (RECIPE + "test_each_step_bug_is_named_alone_and_misses_by_far[step_bugs.py:undivided]",),
    ),
    Mutation(
        "a bf16 recipe is cast to float64, where autocast does nothing", "ddp_demo/check/target.py",
        (('    if dtype == "float64" and recipe.autocast is None:', '    if dtype == "float64":'),),
        (RECIPE + "test_the_bf16_recipe_passes_under_each_strategy[ddp]",),
    ),
    Mutation(
        "zero passes AdamW every default (decoupled_weight_decay, which its __init__ refuses)",
        "ddp_demo/parallel/strategy.py",
        (("**{k: v for k, v in optimizer.defaults.items() if k in accepted})", "**optimizer.defaults)"),),
        (RECIPE + "test_the_bf16_recipe_passes_under_each_strategy[zero]",),
    ),
    Mutation(
        "the trace takes every forward as through the wrapper (model.module goes unseen)", "ddp_demo/check/trace.py",
        (('        self.steps[-1]["forwards"].append([self.entered, self.sync])',
          '        self.steps[-1]["forwards"].append([True, self.sync])'),),
        (RECIPE + "test_each_step_bug_is_named_alone_and_misses_by_far[step_bugs.py:module_forward]",),
    ),
    Mutation(
        "the trace takes every forward as synced (all in no_sync goes unseen)", "ddp_demo/check/trace.py",
        (('        self.steps[-1]["forwards"].append([self.entered, self.sync])',
          '        self.steps[-1]["forwards"].append([self.entered, True])'),),
        (RECIPE + "test_each_step_bug_is_named_alone_and_misses_by_far[step_bugs.py:all_in_no_sync]",
         RECIPE + "test_the_recipe_is_what_ran"),
    ),
    Mutation(
        "numpy's generator is not fingerprinted", "ddp_demo/check/trace.py",
        (('    if "numpy" in sys.modules:', "    if False:"),),
        (RECIPE + "test_each_step_bug_is_named_alone_and_misses_by_far[step_bugs.py:rank_seeded_numpy]",),
    ),
    Mutation(
        "local gradients are not kept, so edits to them go unseen", "ddp_demo/check/trace.py",
        (("        if not self.sync:\n            self.local[", "        if False:\n            self.local["),),
        (RECIPE + "test_each_step_bug_is_named_alone_and_misses_by_far[step_bugs.py:decay_local]",),
    ),
    Mutation(
        "clipping is never seen as local", "ddp_demo/check/trace.py",
        (('        self.steps[-1]["clips"].append(not self.sync)', '        self.steps[-1]["clips"].append(False)'),),
        (RECIPE + "test_each_step_bug_is_named_alone_and_misses_by_far[step_bugs.py:clip_local]",),
    ),
    Mutation(
        "the learning rates are not compared (lr x N goes unnamed)", "ddp_demo/check/diagnose_step.py",
        (("    if not ratios or not all(math.isclose(r, n, rel_tol=1e-9) and n > 1 for n, r in ratios.items()):",
          "    if True:"),),
        (RECIPE + "test_each_step_bug_is_named_alone_and_misses_by_far[step_bugs.py:lr_scaled]",),
    ),
    Mutation(
        "a stalled check names the first rank, not the one behind", "ddp_demo/check/stalled.py",
        (('    return min(behind, key=lambda s: (s.get("events", 0), s["time"], s["rank"]))', "    return states[0]"),),
        (RECIPE + "test_the_rank_named_is_the_one_to_blame",),
    ),
    Mutation(
        "a rank whose collective gave up waiting is blamed, not the rank it waited for", "ddp_demo/check/stalled.py",
        (('    raised = [s for s in states if s.get("raised") and not _waited(s)]',
          '    raised = [s for s in states if s.get("raised")]'),),
        (RECIPE + "test_the_rank_named_is_the_one_to_blame",),
    ),
    Mutation(
        "no rank writes where it is (the stalled line cannot name a step)", "ddp_demo/check/trace.py",
        (("        if self.path is not None:\n            tmp", "        if False:\n            tmp"),),
        (RECIPE + "test_a_step_that_stops_one_rank_ends_in_one_line_exit_2_and_leaves_no_process",),
    ),
    Mutation(
        "a rank that raised alone no longer stops the others", "ddp_demo/check/stalled.py",
        (('    return any(o.get("world") == s["world_raised"]',
          '    return False and any(o.get("world") == s["world_raised"]'),),
        (RECIPE + "test_others_wait_only_when_a_rank_raised_alone",),
    ),
    Mutation(
        "CI lets a skipped test pass (no namespaces or SLURM there would hide a required check)", "tests/no_skips.py",
        (('        report.outcome = "failed"\n', '        pass\n'),),
        ("tests/test_no_skips.py::test_a_skip_fails_only_where_every_test_must_run",),
    ),
    Mutation(
        "a run that gave up on a stuck rank still waits out its timeout", "ddp_demo/core/spawn.py",
        (("p.join(timeout=1.0 if gave_up else max(1.0, deadline - time.monotonic()))",
          "p.join(timeout=max(1.0, deadline - time.monotonic()))"),),
        (RECIPE + "test_giving_up_on_a_stuck_rank_ends_the_run_at_once_not_at_its_timeout",),
    ),
)

