"""lunsync.target: the iSCSI data-path front end (PDU codec, login and session state machines, SCSI emulation, portal)."""
