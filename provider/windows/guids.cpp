// Defines (once per binary) the interface and class ids the VSS headers only declare (IID_IVssAsync,
// CLSID_VSSCoordinator, ...): mingw-w64's libuuid does not carry them. DEFINE_GUID under INITGUID emits selectany
// constants, so one that libuuid also has is harmless.
#include <initguid.h>

#include <windows.h>
#include <comadmin.h>
#include <vdslun.h>
#include <vsadmin.h>
#include <vsprov.h>
#include <vss.h>

