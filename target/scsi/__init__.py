"""lunsync.target.scsi: SPC-4/SBC-3 emulation over the block-device protocol of lunsync.snapshots."""
