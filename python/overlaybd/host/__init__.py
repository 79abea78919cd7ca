"""Host plumbing every upper package shares: commands, mounts, loop devices, mkfs, the mount table.

Why one package: the snapshotter, the convertor, the FUSE frontend and the CLI all mount, attach
loop devices and make file systems; one implementation keeps their options and error messages
the same. It sits at the bottom: it imports nothing else of the project.
"""
