"""Running fedseg jobs on real FLARE systems: provisioned hospital sites and local POC systems.

- :mod:`fedseg.deploy.project`: the consortium's ``project.yml`` (participants, roles, builders) and provisioning;
- :mod:`fedseg.deploy.kits`: startup kits on disk (which participant, which role) and their certificates, checked
  before use (missing files, expired or foreign certificates) with errors that name the file and the fix;
- :mod:`fedseg.deploy.site_config`: a site's ``local/`` settings (job storage, class allow-list, GPUs, data);
- :mod:`fedseg.deploy.system`: start and stop a system's processes from their kits, by PID;
- :mod:`fedseg.deploy.submit`: submit a job folder through the FLARE API and follow it to the end.

These adapt FLARE's own tools (``nvflare provision``, ``nvflare poc``, the startup kits' ``sub_start.sh``, the FLARE
API); none of fedseg's algorithms live here.
"""
