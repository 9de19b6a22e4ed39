"""Guest assembly.

Provisioning order, boot configuration, seed disk, writable root, image disks and virtio-fs shares.
"""
