"""Example virtio devices that ship with trio_vhost (served by the ``trio-vhost`` CLI)."""
