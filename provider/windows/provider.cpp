// The VSS hardware provider: a COM in-process server whose object implements IVssHardwareSnapshotProvider(Ex),
// IVssProviderCreateSnapshotSet and IVssProviderNotifications, and the IVssAsync that ResyncLuns returns. Each
// method is one call to the lunsync REST API (docs/provider.md): the arguments become JSON, the answer becomes
// VDS_LUN_INFORMATION or an HRESULT. The array decides everything (which LUNs are its own, where a snapshot is
// exposed, how a restore runs); this file only translates, and reports each failure to the event log.
#include <windows.h>
#include <olectl.h>
#include <vdslun.h>
#include <vsprov.h>
#include <vss.h>

#include <atomic>
#include <string>

#include "client.h"

using lunsync::ApiClient;
using lunsync::ApiResult;
using lunsync::Json;

namespace {

std::atomic<long> g_objects{0};
std::atomic<long> g_locks{0};
HMODULE g_module = nullptr;

// Load the settings and make one call; on any failure the event log gets the message.
ApiResult call_array(const wchar_t* method, const std::string& path, const Json* body, DWORD extra_wait_ms = 0) {
    lunsync::Settings settings;
    std::wstring error;
    ApiResult r;
    if (!lunsync::load_settings(&settings, &error)) {
        r.hr = VSS_E_PROVIDER_VETO;
        r.message = error;
    } else {
        r = ApiClient(settings).call(method, path, body, extra_wait_ms);
    }
    if (FAILED(r.hr)) lunsync::report_error(r.hr, r.message);
    return r;
}

DWORD resync_rate() {
    lunsync::Settings s;
    std::wstring ignored;
    return lunsync::load_settings(&s, &ignored) ? s.resync_rate_mib_s : 0;
}

HRESULT unexpected(const std::wstring& why) {
    lunsync::report_error(VSS_E_UNEXPECTED_PROVIDER_ERROR, why);
    return VSS_E_UNEXPECTED_PROVIDER_ERROR;
}

// IVssAsync over a recovery set: QueryStatus is GET /v1/provider/async/{id}, Wait is its /wait, Cancel its
// /cancel (the provider's forms of /v1/recovery/{id}, which answer refusals with VSS names).
class RecoveryAsync final : public IVssAsync {
public:
    explicit RecoveryAsync(std::string id) : id_(std::move(id)) { ++g_objects; }
    ~RecoveryAsync() { --g_objects; }

    HRESULT STDMETHODCALLTYPE QueryInterface(REFIID riid, void** out) override {
        if (!out) return E_POINTER;
        if (IsEqualIID(riid, IID_IUnknown) || IsEqualIID(riid, IID_IVssAsync)) {
            *out = static_cast<IVssAsync*>(this);
            AddRef();
            return S_OK;
        }
        *out = nullptr;
        return E_NOINTERFACE;
    }
    ULONG STDMETHODCALLTYPE AddRef() override { return static_cast<ULONG>(++refs_); }
    ULONG STDMETHODCALLTYPE Release() override {
        long n = --refs_;
        if (n == 0) delete this;
        return static_cast<ULONG>(n);
    }

    HRESULT STDMETHODCALLTYPE Cancel() override {
        ApiResult r = call_array(L"POST", base() + "/cancel", nullptr);
        if (r.hr == VSS_E_BAD_STATE) return VSS_S_ASYNC_FINISHED;  // documented: nothing left to cancel
        return FAILED(r.hr) ? r.hr : S_OK;
    }

    HRESULT STDMETHODCALLTYPE Wait(DWORD ms) override {
        ULONGLONG deadline = ms == INFINITE ? 0 : GetTickCount64() + ms;
        while (true) {
            DWORD slice_ms = 30000;
            if (ms != INFINITE) {
                ULONGLONG now = GetTickCount64();
                if (now >= deadline) return S_OK;  // the caller then asks QueryStatus
                slice_ms = static_cast<DWORD>(deadline - now < slice_ms ? deadline - now : slice_ms);
            }
            char q[48];
            snprintf(q, sizeof q, "/wait?timeout_s=%.3f", slice_ms / 1000.0);
            ApiResult r = call_array(L"POST", base() + q, nullptr, slice_ms);
            if (FAILED(r.hr)) return r.hr;
            if (terminal(r.body["state"].as_string())) return S_OK;
        }
    }

    HRESULT STDMETHODCALLTYPE QueryStatus(HRESULT* status, INT* reserved) override {
        if (!status) return E_POINTER;
        ApiResult r = call_array(L"GET", base(), nullptr);
        if (FAILED(r.hr)) return r.hr;
        const std::string& state = r.body["state"].as_string();
        // pReserved is reserved by the SDK; VSS passes NULL. A caller that passes a pointer gets the percent done.
        if (reserved) *reserved = static_cast<INT>(r.body["percent"].as_number(0));
        if (state == "done") {
            *status = VSS_S_ASYNC_FINISHED;
        } else if (state == "cancelled") {
            *status = VSS_S_ASYNC_CANCELLED;
        } else if (state == "failed") {
            *status = VSS_E_PROVIDER_VETO;
            lunsync::report_error(VSS_E_PROVIDER_VETO, L"recovery set " + lunsync::widen(id_) + L" failed: " +
                                                           lunsync::widen(r.body["error"].as_string()));
        } else if (state == "pending" || state == "pre-restore" || state == "resyncing") {
            *status = VSS_S_ASYNC_PENDING;
        } else {
            return unexpected(L"recovery set " + lunsync::widen(id_) + L" is in an unknown state " +
                              lunsync::widen(state));
        }
        return S_OK;
    }

private:
    std::atomic<long> refs_{1};
    std::string id_;

    std::string base() const { return "/v1/provider/async/" + id_; }
    static bool terminal(const std::string& s) { return s == "done" || s == "failed" || s == "cancelled"; }
};

class Provider final : public IVssHardwareSnapshotProviderEx,
                       public IVssProviderCreateSnapshotSet,
                       public IVssProviderNotifications {
public:
    Provider() { ++g_objects; }
    ~Provider() { --g_objects; }

    // -- IUnknown --
    HRESULT STDMETHODCALLTYPE QueryInterface(REFIID riid, void** out) override {
        if (!out) return E_POINTER;
        if (IsEqualIID(riid, IID_IUnknown) || IsEqualIID(riid, IID_IVssHardwareSnapshotProvider) ||
            IsEqualIID(riid, IID_IVssHardwareSnapshotProviderEx)) {
            *out = static_cast<IVssHardwareSnapshotProviderEx*>(this);
        } else if (IsEqualIID(riid, IID_IVssProviderCreateSnapshotSet)) {
            *out = static_cast<IVssProviderCreateSnapshotSet*>(this);
        } else if (IsEqualIID(riid, IID_IVssProviderNotifications)) {
            *out = static_cast<IVssProviderNotifications*>(this);
        } else {
            *out = nullptr;
            return E_NOINTERFACE;
        }
        AddRef();
        return S_OK;
    }
    ULONG STDMETHODCALLTYPE AddRef() override { return static_cast<ULONG>(++refs_); }
    ULONG STDMETHODCALLTYPE Release() override {
        long n = --refs_;
        if (n == 0) delete this;
        return static_cast<ULONG>(n);
    }

    // -- IVssHardwareSnapshotProvider --

    HRESULT STDMETHODCALLTYPE AreLunsSupported(LONG count, LONG context, VSS_PWSZ*, VDS_LUN_INFORMATION* luns,
                                               BOOL* supported) override {
        if (!supported || !luns || count <= 0) return E_INVALIDARG;
        *supported = FALSE;
        Json body = Json::object().set("luns", lunsync::luns_to_json(luns, static_cast<size_t>(count)))
                        .set("context", static_cast<long long>(context));
        ApiResult r = call_array(L"POST", "/v1/provider/are-luns-supported", &body);
        if (FAILED(r.hr)) return r.hr;
        *supported = r.body["supported"].as_bool(false) ? TRUE : FALSE;
        return S_OK;
    }

    HRESULT STDMETHODCALLTYPE FillInLunInfo(VSS_PWSZ, VDS_LUN_INFORMATION* lun, BOOL* supported) override {
        if (!lun || !supported) return E_INVALIDARG;
        *supported = FALSE;
        Json body = Json::object().set("lun", lunsync::lun_to_json(*lun));
        ApiResult r = call_array(L"POST", "/v1/provider/fill-in-lun-info", &body);
        if (FAILED(r.hr)) return r.hr;
        if (!r.body["supported"].as_bool(false)) return S_OK;
        VDS_LUN_INFORMATION filled{};
        if (!lunsync::lun_from_json(r.body["lun_information"], &filled))
            return unexpected(L"FillInLunInfo: the array's lun_information is malformed");
        lunsync::free_lun(lun);  // VSS allocated the old fields with CoTaskMemAlloc and frees ours the same way
        *lun = filled;
        *supported = TRUE;
        return S_OK;
    }

    HRESULT STDMETHODCALLTYPE BeginPrepareSnapshot(VSS_ID set_id, VSS_ID snapshot_id, LONG context, LONG count,
                                                   VSS_PWSZ*, VDS_LUN_INFORMATION* luns) override {
        if (!luns || count <= 0) return E_INVALIDARG;
        Json body = Json::object()
                        .set("snapshot_id", lunsync::guid_text(snapshot_id))
                        .set("luns", lunsync::luns_to_json(luns, static_cast<size_t>(count)))
                        .set("context", static_cast<long long>(context));
        return call_array(L"POST", set_path(set_id) + "/begin-prepare", &body).hr;
    }

    HRESULT STDMETHODCALLTYPE GetTargetLuns(LONG count, VSS_PWSZ*, VDS_LUN_INFORMATION* sources,
                                            VDS_LUN_INFORMATION* destinations) override {
        if (!sources || !destinations || count <= 0) return E_INVALIDARG;
        Json body = Json::object().set("luns", lunsync::luns_to_json(sources, static_cast<size_t>(count)));
        // VSS asks right after PostCommitSnapshots; the set just committed names which snapshots are meant.
        if (!committed_set_.empty()) body.set("snapshot_set_id", committed_set_);
        ApiResult r = call_array(L"POST", "/v1/provider/get-target-luns", &body);
        if (FAILED(r.hr)) return r.hr;
        const Json& out = r.body["luns"];
        if (out.size() != static_cast<size_t>(count))
            return unexpected(L"GetTargetLuns: the array answered for " + std::to_wstring(out.size()) + L" of " +
                              std::to_wstring(count) + L" LUNs");
        for (LONG i = 0; i < count; ++i) {
            VDS_LUN_INFORMATION target{};
            if (!lunsync::lun_from_json(out.at(static_cast<size_t>(i))["target"], &target)) {
                for (LONG k = 0; k < i; ++k) lunsync::free_lun(&destinations[k]);
                return unexpected(L"GetTargetLuns: the array's target LUN information is malformed");
            }
            destinations[i] = target;
        }
        return S_OK;
    }

    HRESULT STDMETHODCALLTYPE LocateLuns(LONG count, VDS_LUN_INFORMATION* luns) override {
        if (!luns || count <= 0) return E_INVALIDARG;
        Json body = Json::object().set("luns", lunsync::luns_to_json(luns, static_cast<size_t>(count)));
        return call_array(L"POST", "/v1/provider/locate-luns", &body).hr;
    }

    HRESULT STDMETHODCALLTYPE OnLunEmpty(VSS_PWSZ, VDS_LUN_INFORMATION* lun) override {
        if (!lun) return E_INVALIDARG;
        Json body = Json::object().set("lun", lunsync::lun_to_json(*lun));
        return call_array(L"POST", "/v1/provider/on-lun-empty", &body).hr;
    }

    // -- IVssHardwareSnapshotProviderEx --

    HRESULT STDMETHODCALLTYPE GetProviderCapabilities(ULONGLONG* mask) override {
        if (!mask) return E_INVALIDARG;
        ApiResult r = call_array(L"GET", "/v1/provider/capabilities", nullptr);
        if (FAILED(r.hr)) return r.hr;
        if (!r.body["mask"].is_number()) return unexpected(L"GetProviderCapabilities: no mask in the answer");
        *mask = static_cast<ULONGLONG>(r.body["mask"].as_number());
        return S_OK;
    }

    HRESULT STDMETHODCALLTYPE OnLunStateChange(VDS_LUN_INFORMATION* snapshots, VDS_LUN_INFORMATION* originals,
                                               DWORD count, DWORD flags) override {
        Json body = Json::object()
                        .set("snapshot_luns", snapshots ? lunsync::luns_to_json(snapshots, count) : Json::array())
                        .set("original_luns", originals ? lunsync::luns_to_json(originals, count) : Json::array())
                        .set("flags", static_cast<unsigned long long>(flags));
        return call_array(L"POST", "/v1/provider/on-lun-state-change", &body).hr;
    }

    HRESULT STDMETHODCALLTYPE ResyncLuns(VDS_LUN_INFORMATION* sources, VDS_LUN_INFORMATION* targets, DWORD count,
                                         IVssAsync** async) override {
        if (!sources || !targets || !async || count == 0) return E_INVALIDARG;
        *async = nullptr;
        Json body = Json::object()
                        .set("source_luns", lunsync::luns_to_json(sources, count))
                        .set("target_luns", lunsync::luns_to_json(targets, count));
        if (DWORD rate = resync_rate()) body.set("rate_mib_s", static_cast<unsigned long long>(rate));
        ApiResult r = call_array(L"POST", "/v1/provider/resync-luns", &body);
        if (FAILED(r.hr)) return r.hr;
        const std::string& id = r.body["id"].as_string();
        if (id.empty()) return unexpected(L"ResyncLuns: the array returned no recovery set id");
        *async = new (std::nothrow) RecoveryAsync(id);
        return *async ? S_OK : E_OUTOFMEMORY;
    }

    HRESULT STDMETHODCALLTYPE OnReuseLuns(VDS_LUN_INFORMATION* snapshots, VDS_LUN_INFORMATION* originals,
                                          DWORD count) override {
        if (!snapshots || count == 0) return E_INVALIDARG;
        Json body = Json::object()
                        .set("snapshot_luns", lunsync::luns_to_json(snapshots, count))
                        .set("original_luns", originals ? lunsync::luns_to_json(originals, count) : Json::array());
        return call_array(L"POST", "/v1/provider/on-reuse-luns", &body).hr;
    }

    // -- IVssProviderCreateSnapshotSet --

    HRESULT STDMETHODCALLTYPE EndPrepareSnapshots(VSS_ID set_id) override {
        return call_array(L"POST", set_path(set_id) + "/end-prepare", nullptr).hr;
    }
    HRESULT STDMETHODCALLTYPE PreCommitSnapshots(VSS_ID set_id) override {
        return call_array(L"POST", set_path(set_id) + "/pre-commit", nullptr).hr;
    }
    HRESULT STDMETHODCALLTYPE CommitSnapshots(VSS_ID set_id) override {
        HRESULT hr = call_array(L"POST", set_path(set_id) + "/commit", nullptr).hr;
        if (SUCCEEDED(hr)) committed_set_ = lunsync::guid_text(set_id);
        return hr;
    }
    HRESULT STDMETHODCALLTYPE PostCommitSnapshots(VSS_ID set_id, LONG count) override {
        Json body = Json::object().set("count", static_cast<long long>(count));
        return call_array(L"POST", set_path(set_id) + "/post-commit", &body).hr;
    }
    // The snapshots are complete at CommitSnapshots; the final-commit phases (auto-recovery writes by VSS, which
    // lunsync's read-only snapshots do not take) have nothing to do on the array.
    HRESULT STDMETHODCALLTYPE PreFinalCommitSnapshots(VSS_ID) override { return S_OK; }
    HRESULT STDMETHODCALLTYPE PostFinalCommitSnapshots(VSS_ID) override { return S_OK; }
    HRESULT STDMETHODCALLTYPE AbortSnapshots(VSS_ID set_id) override {
        ApiResult r = call_array(L"POST", set_path(set_id) + "/abort", nullptr);
        if (lunsync::guid_text(set_id) == committed_set_) committed_set_.clear();
        // VSS aborts every provider of a failed set, including one that never saw BeginPrepareSnapshot.
        if (r.hr == VSS_E_OBJECT_NOT_FOUND) return S_OK;
        return r.hr;
    }

    // -- IVssProviderNotifications --
    HRESULT STDMETHODCALLTYPE OnLoad(IUnknown*) override { return S_OK; }
    HRESULT STDMETHODCALLTYPE OnUnload(BOOL) override { return S_OK; }

private:
    std::atomic<long> refs_{1};
    std::string committed_set_;

    static std::string set_path(const VSS_ID& id) { return "/v1/provider/snapshot-sets/" + lunsync::guid_text(id); }
};

class Factory final : public IClassFactory {
public:
    HRESULT STDMETHODCALLTYPE QueryInterface(REFIID riid, void** out) override {
        if (!out) return E_POINTER;
        if (IsEqualIID(riid, IID_IUnknown) || IsEqualIID(riid, IID_IClassFactory)) {
            *out = static_cast<IClassFactory*>(this);
            AddRef();
            return S_OK;
        }
        *out = nullptr;
        return E_NOINTERFACE;
    }
    // One static factory per process: its references keep the module as a lock would.
    ULONG STDMETHODCALLTYPE AddRef() override { ++g_locks; return 2; }
    ULONG STDMETHODCALLTYPE Release() override { --g_locks; return 1; }

    HRESULT STDMETHODCALLTYPE CreateInstance(IUnknown* outer, REFIID riid, void** out) override {
        if (!out) return E_POINTER;
        *out = nullptr;
        if (outer) return CLASS_E_NOAGGREGATION;
        Provider* p = new (std::nothrow) Provider();
        if (!p) return E_OUTOFMEMORY;
        HRESULT hr = p->QueryInterface(riid, out);
        p->Release();
        return hr;
    }
    HRESULT STDMETHODCALLTYPE LockServer(BOOL lock) override {
        if (lock) ++g_locks; else --g_locks;
        return S_OK;
    }
};

Factory g_factory;

LONG set_value(HKEY key, const wchar_t* name, const std::wstring& value) {
    return RegSetValueExW(key, name, 0, REG_SZ, reinterpret_cast<const BYTE*>(value.c_str()),
                          static_cast<DWORD>((value.size() + 1) * sizeof(wchar_t)));
}

std::wstring clsid_key() { return L"CLSID\\" + lunsync::guid_wtext(lunsync::kProviderClsid); }

}  // namespace

extern "C" {

BOOL WINAPI DllMain(HINSTANCE instance, DWORD reason, LPVOID) {
    if (reason == DLL_PROCESS_ATTACH) {
        g_module = instance;
        DisableThreadLibraryCalls(instance);
    }
    return TRUE;
}

STDAPI DllGetClassObject(REFCLSID clsid, REFIID riid, LPVOID* out) {
    if (!out) return E_POINTER;
    *out = nullptr;
    if (!IsEqualCLSID(clsid, lunsync::kProviderClsid)) return CLASS_E_CLASSNOTAVAILABLE;
    return g_factory.QueryInterface(riid, out);
}

STDAPI DllCanUnloadNow() { return g_objects == 0 && g_locks == 0 ? S_OK : S_FALSE; }

// HKCR\CLSID\{clsid}\InprocServer32 = this DLL, ThreadingModel Both (VSS calls from its own MTA threads).
STDAPI DllRegisterServer() {
    wchar_t path[MAX_PATH];
    DWORD n = GetModuleFileNameW(g_module, path, MAX_PATH);
    if (n == 0 || n >= MAX_PATH) return SELFREG_E_CLASS;
    HKEY key = nullptr;
    if (RegCreateKeyExW(HKEY_CLASSES_ROOT, clsid_key().c_str(), 0, nullptr, 0, KEY_WRITE, nullptr, &key, nullptr) !=
        ERROR_SUCCESS)
        return SELFREG_E_CLASS;
    LONG rc = set_value(key, nullptr, lunsync::kProviderName);
    RegCloseKey(key);
    if (rc != ERROR_SUCCESS) return SELFREG_E_CLASS;
    if (RegCreateKeyExW(HKEY_CLASSES_ROOT, (clsid_key() + L"\\InprocServer32").c_str(), 0, nullptr, 0, KEY_WRITE,
                        nullptr, &key, nullptr) != ERROR_SUCCESS)
        return SELFREG_E_CLASS;
    rc = set_value(key, nullptr, path);
    if (rc == ERROR_SUCCESS) rc = set_value(key, L"ThreadingModel", L"Both");
    RegCloseKey(key);
    return rc == ERROR_SUCCESS ? S_OK : SELFREG_E_CLASS;
}

STDAPI DllUnregisterServer() {
    LONG rc = RegDeleteTreeW(HKEY_CLASSES_ROOT, clsid_key().c_str());
    return rc == ERROR_SUCCESS || rc == ERROR_FILE_NOT_FOUND ? S_OK : SELFREG_E_CLASS;
}

}  // extern "C"
