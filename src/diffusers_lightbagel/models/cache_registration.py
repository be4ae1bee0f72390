"""Support for diffusers' step-caching hooks (FirstBlockCache and others) in the LightBagel transformer.

diffusers' caching hooks look up each transformer block class in `TransformerBlockRegistry` to know which forward
argument is `hidden_states` and which output is the updated hidden states. `register_lightbagel_blocks` adds the
LightBagel block classes to that registry.

diffusers' First Block Cache also assumes that the blocks it finds in the `blocks` list are all the blocks that
run, in list order. The LightBagel transformer runs a fusion block after every DiT block, from a second list
(`fusion_blocks`), so `LightBagelCacheMixin.enable_cache` applies First Block Cache itself, over the blocks in
execution order: the first DiT block decides, and the last fusion block records the residual that a skipped step
adds back.
"""

from __future__ import annotations

import torch.nn as nn

from diffusers.hooks import FirstBlockCacheConfig, HookRegistry
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.first_block_cache import (
    _FBC_BLOCK_HOOK,
    _FBC_LEADER_BLOCK_HOOK,
    FBCBlockHook,
    FBCHeadBlockHook,
    FBCSharedBlockState,
)
from diffusers.hooks.hooks import StateManager
from diffusers.models.cache_utils import CacheMixin
from diffusers.utils import logging


logger = logging.get_logger(__name__)

_registered = False


def register_lightbagel_blocks() -> None:
    """Register the LightBagel DiT and fusion block classes with diffusers' `TransformerBlockRegistry`.

    Both blocks take `hidden_states` as their first argument and return the updated hidden states as one tensor.
    Calling this again does nothing.
    """
    global _registered
    if _registered:
        return

    from .fusion_attention import LightBagelFusionBlock
    from .transformer_lightbagel import LightBagelTransformerBlock

    for block_cls in (LightBagelTransformerBlock, LightBagelFusionBlock):
        TransformerBlockRegistry.register(
            model_class=block_cls,
            metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=None),
        )
    _registered = True


def blocks_in_execution_order(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """Return (name, block) for every DiT block and fusion block, in the order the forward pass runs them."""
    ordered = []
    for index, (block, fusion_block) in enumerate(zip(transformer.blocks, transformer.fusion_blocks)):
        ordered.append((f"blocks.{index}", block))
        ordered.append((f"fusion_blocks.{index}", fusion_block))
    return ordered


def apply_lightbagel_first_block_cache(transformer: nn.Module, config: FirstBlockCacheConfig) -> None:
    """Apply First Block Cache over the DiT and fusion blocks in execution order.

    The first DiT block always runs, and its residual decides whether the rest run. When they are skipped, every
    later block (DiT and fusion) returns its input, and the first block's output receives the residual recorded
    after the last fusion block on the most recent full step. The hooks are those of diffusers' First Block Cache,
    so `disable_cache` removes them.
    """
    register_lightbagel_blocks()
    state_manager = StateManager(FBCSharedBlockState, (), {})
    ordered = blocks_in_execution_order(transformer)
    (head_name, head_block), (tail_name, tail_block) = ordered[0], ordered[-1]

    logger.debug(f"First Block Cache: '{head_name}' decides, '{tail_name}' records the residual.")
    HookRegistry.check_if_exists_or_initialize(head_block).register_hook(
        FBCHeadBlockHook(state_manager, config.threshold), _FBC_LEADER_BLOCK_HOOK
    )
    for _, block in ordered[1:-1]:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(
            FBCBlockHook(state_manager, is_tail=False), _FBC_BLOCK_HOOK
        )
    HookRegistry.check_if_exists_or_initialize(tail_block).register_hook(
        FBCBlockHook(state_manager, is_tail=True), _FBC_BLOCK_HOOK
    )


class LightBagelCacheMixin(CacheMixin):
    """diffusers' `CacheMixin`, with First Block Cache applied over the interleaved DiT and fusion blocks.

    Other cache configurations go to diffusers unchanged, after the LightBagel blocks are registered. Those that
    skip whole blocks by walking the `blocks` list (MagCache, SeaCache) would skip the DiT blocks but still run the
    fusion blocks, which adds the fusion blocks' update twice, so they are rejected.
    """

    def enable_cache(self, config) -> None:
        from diffusers.hooks import MagCacheConfig, SeaCacheConfig

        register_lightbagel_blocks()
        if isinstance(config, (MagCacheConfig, SeaCacheConfig)):
            raise ValueError(
                f"{type(config).__name__} is not supported by {type(self).__name__}: it skips the blocks of the "
                "`blocks` list but not the fusion blocks that run between them. Use FirstBlockCacheConfig instead."
            )
        if not isinstance(config, FirstBlockCacheConfig):
            super().enable_cache(config)
            return

        if self.is_cache_enabled:
            raise ValueError(
                f"Caching is already enabled with {type(self._cache_config).__name__}; call disable_cache() first."
            )
        apply_lightbagel_first_block_cache(self, config)
        HookRegistry.check_if_exists_or_initialize(self).invalidate_child_registries_cache()
        self._cache_config = config
