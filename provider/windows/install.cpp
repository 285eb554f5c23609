// lunsync-vss.exe: installs, removes, shows and checks the provider on a Windows host.
//   install --api URL --token-file F [--timeout-ms N] [--resync-rate MIBPS] [--dll PATH]
//   uninstall | status | test
// install checks that the API answers with this token before it changes anything, then stores the settings (the
// token in a key only SYSTEM and Administrators can open), registers the COM class (DllRegisterServer) and the event
// source, installs the DLL into a COM+ server application running as LocalSystem (as VSS hosts hardware providers),
// and registers the provider with VSS (IVssAdmin::RegisterProvider). Exit codes: 0 done, 1 usage, 2 failed,
// 3 installed but the system has no VSS service (nor COM+ catalog) to register with.
#include <windows.h>
#include <comadmin.h>
#include <oleauto.h>
#include <sddl.h>
#include <vsadmin.h>
#include <vss.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>

#include "client.h"

namespace {

using lunsync::Json;

int usage() {
    fwprintf(stderr, L"usage: lunsync-vss.exe install --api URL --token-file F [--timeout-ms N] [--resync-rate MIBPS]"
                     L" [--dll PATH]\n       lunsync-vss.exe uninstall | status | test\n");
    return 1;
}

std::wstring hr_text(HRESULT hr) {
    wchar_t buf[16];
    swprintf(buf, 16, L"0x%08lX", static_cast<unsigned long>(hr));
    return buf;
}

std::wstring default_dll() {
    wchar_t path[MAX_PATH];
    DWORD n = GetModuleFileNameW(nullptr, path, MAX_PATH);
    std::wstring p(path, n);
    size_t slash = p.find_last_of(L"\\/");
    return (slash == std::wstring::npos ? L"" : p.substr(0, slash + 1)) + L"lunsync-vss.dll";
}

LONG set_string(HKEY key, const wchar_t* name, const std::wstring& v) {
    return RegSetValueExW(key, name, 0, REG_SZ, reinterpret_cast<const BYTE*>(v.c_str()),
                          static_cast<DWORD>((v.size() + 1) * sizeof(wchar_t)));
}

LONG set_dword(HKEY key, const wchar_t* name, DWORD v) {
    return RegSetValueExW(key, name, 0, REG_DWORD, reinterpret_cast<const BYTE*>(&v), sizeof v);
}

// The self-registration entry points of the DLL, called as regsvr32 would.
HRESULT call_dll(const std::wstring& dll, const char* entry) {
    HMODULE m = LoadLibraryW(dll.c_str());
    if (!m) return HRESULT_FROM_WIN32(GetLastError());
    using Fn = HRESULT(STDAPICALLTYPE*)();
    auto fn = reinterpret_cast<Fn>(reinterpret_cast<void*>(GetProcAddress(m, entry)));
    HRESULT hr = fn ? fn() : HRESULT_FROM_WIN32(ERROR_PROC_NOT_FOUND);
    FreeLibrary(m);
    return hr;
}

constexpr wchar_t kComPlusApp[] = L"lunsync VSS provider";

struct Bstr {
    BSTR b;
    explicit Bstr(const wchar_t* s) : b(SysAllocString(s)) {}
    ~Bstr() { SysFreeString(b); }
    Bstr(const Bstr&) = delete;
    Bstr& operator=(const Bstr&) = delete;
};

template <class T>
void release(T*& p) {
    if (p) p->Release();
    p = nullptr;
}

// The COM+ catalog's Applications collection, populated; REGDB_E_CLASSNOTREG where there is no COM+ (Wine).
HRESULT applications(ICOMAdminCatalog** catalog, ICatalogCollection** apps) {
    HRESULT hr = CoCreateInstance(CLSID_COMAdminCatalog, nullptr, CLSCTX_INPROC_SERVER, IID_ICOMAdminCatalog,
                                  reinterpret_cast<void**>(catalog));
    if (FAILED(hr)) return hr;
    IDispatch* d = nullptr;
    Bstr name(L"Applications");
    hr = (*catalog)->GetCollection(name.b, &d);
    if (SUCCEEDED(hr)) hr = d->QueryInterface(IID_ICatalogCollection, reinterpret_cast<void**>(apps));
    release(d);
    if (SUCCEEDED(hr)) hr = (*apps)->Populate();
    if (FAILED(hr)) {
        release(*apps);
        release(*catalog);
    }
    return hr;
}

// Remove our application if it is there (a reinstall replaces it; uninstall removes it).
HRESULT remove_app(ICatalogCollection* apps) {
    LONG n = 0;
    HRESULT hr = apps->get_Count(&n);
    for (LONG i = n - 1; SUCCEEDED(hr) && i >= 0; --i) {
        IDispatch* d = nullptr;
        ICatalogObject* app = nullptr;
        VARIANT v;
        VariantInit(&v);
        hr = apps->get_Item(i, &d);
        if (SUCCEEDED(hr)) hr = d->QueryInterface(IID_ICatalogObject, reinterpret_cast<void**>(&app));
        if (SUCCEEDED(hr)) hr = app->get_Name(&v);
        if (SUCCEEDED(hr) && v.vt == VT_BSTR && v.bstrVal && wcscmp(v.bstrVal, kComPlusApp) == 0) hr = apps->Remove(i);
        VariantClear(&v);
        release(app);
        release(d);
    }
    LONG changes = 0;
    return SUCCEEDED(hr) ? apps->SaveChanges(&changes) : hr;
}

HRESULT put(ICatalogObject* obj, const wchar_t* prop, VARIANT v) {
    Bstr name(prop);
    return obj->put_Value(name.b, v);
}

// A COM+ server application running as LocalSystem with the DLL's class installed in it: VSS creates the provider
// in that application's dllhost, the way the SDK's sample provider is installed.
HRESULT register_complus(const std::wstring& dll) {
    ICOMAdminCatalog* catalog = nullptr;
    ICatalogCollection* apps = nullptr;
    HRESULT hr = applications(&catalog, &apps);
    if (FAILED(hr)) return hr;
    hr = remove_app(apps);
    IDispatch* d = nullptr;
    ICatalogObject* app = nullptr;
    if (SUCCEEDED(hr)) hr = apps->Add(&d);
    if (SUCCEEDED(hr)) hr = d->QueryInterface(IID_ICatalogObject, reinterpret_cast<void**>(&app));
    VARIANT v;
    VariantInit(&v);
    if (SUCCEEDED(hr)) {
        v.vt = VT_BSTR;
        v.bstrVal = SysAllocString(kComPlusApp);
        hr = put(app, L"Name", v);
        VariantClear(&v);
    }
    if (SUCCEEDED(hr)) {
        v.vt = VT_BSTR;
        v.bstrVal = SysAllocString(L"NT AUTHORITY\\LocalSystem");
        hr = put(app, L"Identity", v);
        VariantClear(&v);
    }
    if (SUCCEEDED(hr)) {
        v.vt = VT_BOOL;
        v.boolVal = VARIANT_FALSE;  // VSS calls as SYSTEM; COM+ role checks would only get in its way
        hr = put(app, L"ApplicationAccessChecksEnabled", v);
    }
    LONG changes = 0;
    if (SUCCEEDED(hr)) hr = apps->SaveChanges(&changes);
    if (SUCCEEDED(hr)) {
        Bstr name(kComPlusApp), path(dll.c_str()), none(L"");
        hr = catalog->InstallComponent(name.b, path.b, none.b, none.b);
    }
    release(app);
    release(d);
    release(apps);
    release(catalog);
    return hr;
}

HRESULT unregister_complus() {
    ICOMAdminCatalog* catalog = nullptr;
    ICatalogCollection* apps = nullptr;
    HRESULT hr = applications(&catalog, &apps);
    if (FAILED(hr)) return hr;
    hr = remove_app(apps);
    release(apps);
    release(catalog);
    return hr;
}

// The VSS service's admin interface; REGDB_E_CLASSNOTREG when the system has no VSS (Wine, Windows PE).
HRESULT vss_admin(IVssAdmin** out) {
    return CoCreateInstance(CLSID_VSSCoordinator, nullptr, CLSCTX_ALL, IID_IVssAdmin, reinterpret_cast<void**>(out));
}

std::wstring key_sddl(const wchar_t* path) {
    HKEY key = nullptr;
    if (RegOpenKeyExW(HKEY_LOCAL_MACHINE, path, 0, READ_CONTROL, &key) != ERROR_SUCCESS) return L"";
    DWORD size = 0;
    RegGetKeySecurity(key, DACL_SECURITY_INFORMATION, nullptr, &size);
    std::string buf(size ? size : 1, '\0');
    std::wstring out;
    if (RegGetKeySecurity(key, DACL_SECURITY_INFORMATION, &buf[0], &size) == ERROR_SUCCESS) {
        LPWSTR text = nullptr;
        if (ConvertSecurityDescriptorToStringSecurityDescriptorW(&buf[0], SDDL_REVISION_1, DACL_SECURITY_INFORMATION,
                                                                 &text, nullptr)) {
            out = text;
            LocalFree(text);
        }
    }
    RegCloseKey(key);
    return out;
}

// The check install and test share: the array answers GET /v1/provider/capabilities with this URL and token.
bool check_api(const lunsync::Settings& s) {
    lunsync::ApiResult r = lunsync::ApiClient(s).call(L"GET", "/v1/provider/capabilities", nullptr);
    if (FAILED(r.hr)) {
        fwprintf(stderr, L"lunsync-vss: %ls [%ls]\n", r.message.c_str(), hr_text(r.hr).c_str());
        return false;
    }
    wprintf(L"api: %ls answers, capabilities %hs\n", s.api_url.c_str(), r.body["mask_hex"].as_string().c_str());
    return true;
}

int install(const std::wstring& api, const std::wstring& token_file, DWORD timeout_ms, DWORD rate,
            const std::wstring& dll) {
    std::ifstream in(token_file.c_str(), std::ios::binary);  // mingw's libstdc++ takes the wide path
    if (!in) {
        fwprintf(stderr, L"lunsync-vss: cannot read the token file %ls\n", token_file.c_str());
        return 2;
    }
    std::stringstream ss;
    ss << in.rdbuf();
    std::string token = ss.str();
    while (!token.empty() && isspace(static_cast<unsigned char>(token.back()))) token.pop_back();
    while (!token.empty() && isspace(static_cast<unsigned char>(token.front()))) token.erase(token.begin());
    if (token.empty()) {
        fwprintf(stderr, L"lunsync-vss: the token file %ls is empty\n", token_file.c_str());
        return 2;
    }
    lunsync::Settings s;
    s.api_url = api;
    s.token = token;
    s.timeout_ms = timeout_ms;
    s.resync_rate_mib_s = rate;
    if (!check_api(s)) return 2;

    HKEY key = nullptr;
    if (RegCreateKeyExW(HKEY_LOCAL_MACHINE, lunsync::kSettingsKey, 0, nullptr, 0, KEY_ALL_ACCESS, nullptr, &key,
                        nullptr) != ERROR_SUCCESS) {
        fwprintf(stderr, L"lunsync-vss: cannot create HKLM\\%ls (run as Administrator)\n", lunsync::kSettingsKey);
        return 2;
    }
    LONG rc = set_string(key, L"ApiUrl", api);
    if (rc == ERROR_SUCCESS) rc = set_dword(key, L"TimeoutMs", timeout_ms);
    if (rc == ERROR_SUCCESS) rc = set_dword(key, L"ResyncRateMiBps", rate);
    RegCloseKey(key);
    if (rc != ERROR_SUCCESS) {
        fwprintf(stderr, L"lunsync-vss: cannot write the settings (error %ld)\n", rc);
        return 2;
    }
    // The secret key gets its DACL (SYSTEM and Administrators, nothing inherited) before the token is written. It is
    // set with RegSetKeySecurity rather than at RegCreateKeyEx: Wine keeps only the former (the latter reads back
    // the inherited default in the next process), and on Windows both give the same key.
    PSECURITY_DESCRIPTOR sd = nullptr;
    if (!ConvertStringSecurityDescriptorToSecurityDescriptorW(lunsync::kSecretSddl, SDDL_REVISION_1, &sd, nullptr)) {
        fwprintf(stderr, L"lunsync-vss: bad security descriptor (error %lu)\n", GetLastError());
        return 2;
    }
    rc = RegCreateKeyExW(HKEY_LOCAL_MACHINE, lunsync::kSecretKey, 0, nullptr, 0, KEY_ALL_ACCESS, nullptr, &key,
                         nullptr);
    if (rc == ERROR_SUCCESS) rc = RegSetKeySecurity(key, DACL_SECURITY_INFORMATION, sd);
    if (rc == ERROR_SUCCESS) rc = set_string(key, L"Token", lunsync::widen(token));
    if (key) RegCloseKey(key);
    LocalFree(sd);
    if (rc != ERROR_SUCCESS) {
        fwprintf(stderr, L"lunsync-vss: cannot store the token in HKLM\\%ls (error %ld)\n", lunsync::kSecretKey, rc);
        return 2;
    }
    wprintf(L"settings: HKLM\\%ls (token in HKLM\\%ls, %ls)\n", lunsync::kSettingsKey, lunsync::kSecretKey,
            key_sddl(lunsync::kSecretKey).c_str());

    std::wstring source = std::wstring(L"SYSTEM\\CurrentControlSet\\Services\\EventLog\\Application\\") +
                          lunsync::kEventSource;
    if (RegCreateKeyExW(HKEY_LOCAL_MACHINE, source.c_str(), 0, nullptr, 0, KEY_WRITE, nullptr, &key, nullptr) ==
        ERROR_SUCCESS) {
        set_dword(key, L"TypesSupported", EVENTLOG_ERROR_TYPE | EVENTLOG_WARNING_TYPE | EVENTLOG_INFORMATION_TYPE);
        RegCloseKey(key);
    }

    HRESULT hr = call_dll(dll, "DllRegisterServer");
    if (FAILED(hr)) {
        fwprintf(stderr, L"lunsync-vss: DllRegisterServer of %ls failed [%ls]\n", dll.c_str(), hr_text(hr).c_str());
        return 2;
    }
    wprintf(L"com: %ls registered as %ls\n", dll.c_str(), lunsync::guid_wtext(lunsync::kProviderClsid).c_str());
    hr = register_complus(dll);
    if (hr == REGDB_E_CLASSNOTREG) {
        wprintf(L"com+: this system has no COM+ catalog [%ls]; the class stays an in-process server\n",
                hr_text(hr).c_str());
    } else if (FAILED(hr)) {
        fwprintf(stderr, L"lunsync-vss: installing the COM+ application failed [%ls]\n", hr_text(hr).c_str());
        return 2;
    } else {
        wprintf(L"com+: application \"%ls\" (LocalSystem) hosts the provider\n", kComPlusApp);
    }

    IVssAdmin* admin = nullptr;
    hr = vss_admin(&admin);
    if (hr == REGDB_E_CLASSNOTREG) {
        wprintf(L"vss: this system has no VSS service (CLSID_VSSCoordinator is not registered [%ls]); the provider"
                L" is not registered with VSS\n", hr_text(hr).c_str());
        return 3;
    }
    if (FAILED(hr)) {
        fwprintf(stderr, L"lunsync-vss: cannot reach the VSS service [%ls]\n", hr_text(hr).c_str());
        return 2;
    }
    hr = admin->RegisterProvider(lunsync::kProviderId, lunsync::kProviderClsid,
                                 const_cast<VSS_PWSZ>(lunsync::kProviderName), VSS_PROV_HARDWARE,
                                 const_cast<VSS_PWSZ>(lunsync::kProviderVersion), lunsync::kProviderVersionId);
    admin->Release();
    if (hr == VSS_E_PROVIDER_ALREADY_REGISTERED) hr = S_OK;
    if (FAILED(hr)) {
        fwprintf(stderr, L"lunsync-vss: IVssAdmin::RegisterProvider failed [%ls]\n", hr_text(hr).c_str());
        return 2;
    }
    wprintf(L"vss: registered provider %ls (vssadmin list providers)\n",
            lunsync::guid_wtext(lunsync::kProviderId).c_str());
    return 0;
}

int uninstall(const std::wstring& dll) {
    int rc = 0;
    IVssAdmin* admin = nullptr;
    HRESULT hr = vss_admin(&admin);
    if (SUCCEEDED(hr)) {
        hr = admin->UnregisterProvider(lunsync::kProviderId);
        admin->Release();
        if (FAILED(hr) && hr != VSS_E_PROVIDER_NOT_REGISTERED) {
            fwprintf(stderr, L"lunsync-vss: IVssAdmin::UnregisterProvider failed [%ls]\n", hr_text(hr).c_str());
            rc = 2;
        }
    }
    hr = unregister_complus();
    if (FAILED(hr) && hr != REGDB_E_CLASSNOTREG) {
        fwprintf(stderr, L"lunsync-vss: removing the COM+ application failed [%ls]\n", hr_text(hr).c_str());
        rc = 2;
    }
    hr = call_dll(dll, "DllUnregisterServer");
    if (FAILED(hr)) {
        fwprintf(stderr, L"lunsync-vss: DllUnregisterServer failed [%ls]\n", hr_text(hr).c_str());
        rc = 2;
    }
    LONG r = RegDeleteTreeW(HKEY_LOCAL_MACHINE, L"SOFTWARE\\lunsync\\VssProvider");
    if (r != ERROR_SUCCESS && r != ERROR_FILE_NOT_FOUND) rc = 2;
    RegDeleteTreeW(HKEY_LOCAL_MACHINE, (std::wstring(L"SYSTEM\\CurrentControlSet\\Services\\EventLog\\Application\\") +
                                        lunsync::kEventSource).c_str());
    wprintf(L"uninstalled%ls\n", rc ? L" (with errors)" : L"");
    return rc;
}

// One JSON object: what is installed where. Exit 0 when the settings and the COM class are in place.
int status() {
    lunsync::Settings s;
    std::wstring error;
    bool configured = lunsync::load_settings(&s, &error);
    Json out = Json::object();
    out.set("configured", configured).set("api_url", lunsync::narrow(s.api_url))
        .set("token_present", !s.token.empty()).set("timeout_ms", static_cast<unsigned long long>(s.timeout_ms))
        .set("resync_rate_mib_s", static_cast<unsigned long long>(s.resync_rate_mib_s))
        .set("token_key_sddl", lunsync::narrow(key_sddl(lunsync::kSecretKey)));
    if (!configured) out.set("error", lunsync::narrow(error));
    std::wstring inproc = L"CLSID\\" + lunsync::guid_wtext(lunsync::kProviderClsid) + L"\\InprocServer32";
    wchar_t path[MAX_PATH] = {};
    DWORD size = sizeof path;
    bool com = RegGetValueW(HKEY_CLASSES_ROOT, inproc.c_str(), nullptr, RRF_RT_REG_SZ, nullptr, path, &size) ==
               ERROR_SUCCESS;
    out.set("clsid", lunsync::narrow(lunsync::guid_wtext(lunsync::kProviderClsid)))
        .set("com_registered", com).set("dll", lunsync::narrow(com ? path : L""))
        .set("provider_id", lunsync::narrow(lunsync::guid_wtext(lunsync::kProviderId)));
    IVssAdmin* admin = nullptr;
    HRESULT hr = vss_admin(&admin);
    if (admin) admin->Release();
    out.set("vss_service", SUCCEEDED(hr)).set("vss_hresult", lunsync::narrow(hr_text(hr)));
    printf("%s\n", out.dump().c_str());
    return configured && com ? 0 : 2;
}

int test() {
    lunsync::Settings s;
    std::wstring error;
    if (!lunsync::load_settings(&s, &error)) {
        fwprintf(stderr, L"lunsync-vss: %ls\n", error.c_str());
        return 2;
    }
    return check_api(s) ? 0 : 2;
}

}  // namespace

int wmain(int argc, wchar_t** argv) {
    if (argc < 2) return usage();
    std::wstring cmd = argv[1], api, token_file, dll = default_dll();
    DWORD timeout_ms = lunsync::kDefaultTimeoutMs, rate = 0;
    for (int i = 2; i < argc; ++i) {
        std::wstring a = argv[i];
        if (i + 1 >= argc) return usage();
        if (a == L"--api") api = argv[++i];
        else if (a == L"--token-file") token_file = argv[++i];
        else if (a == L"--dll") dll = argv[++i];
        else if (a == L"--timeout-ms") timeout_ms = static_cast<DWORD>(_wtoi(argv[++i]));
        else if (a == L"--resync-rate") rate = static_cast<DWORD>(_wtoi(argv[++i]));
        else return usage();
    }
    if (FAILED(CoInitializeEx(nullptr, COINIT_MULTITHREADED))) return 2;
    // IVssAdmin refuses callers without the right to impersonate them; VSS's own tools set this up the same way.
    CoInitializeSecurity(nullptr, -1, nullptr, nullptr, RPC_C_AUTHN_LEVEL_PKT_PRIVACY, RPC_C_IMP_LEVEL_IMPERSONATE,
                         nullptr, EOAC_NONE, nullptr);
    int rc;
    if (cmd == L"install") {
        rc = api.empty() || token_file.empty() ? usage() : install(api, token_file, timeout_ms, rate, dll);
    } else if (cmd == L"uninstall") {
        rc = uninstall(dll);
    } else if (cmd == L"status") {
        rc = status();
    } else if (cmd == L"test") {
        rc = test();
    } else {
        rc = usage();
    }
    CoUninitialize();
    return rc;
}
