// What the provider DLL, the installer and the harness share: the provider's identity (CLSID, VSS provider id),
// the registry settings, the lunsync REST client over WinHTTP with its error-to-HRESULT mapping, and the
// VDS_LUN_INFORMATION <-> JSON translation. Everything the array could decide is asked of the array; this layer
// only carries the question and maps the answer.
#pragma once

#include <windows.h>
#include <vdslun.h>
#include <vss.h>
#include <vsserror.h>

#include <string>
#include <vector>

#include "json.h"

namespace lunsync {

// {f83a1aa3-d25c-446c-b046-a70ff4854ff8}: the COM class of the provider object.
constexpr GUID kProviderClsid = {0xf83a1aa3, 0xd25c, 0x446c, {0xb0, 0x46, 0xa7, 0x0f, 0xf4, 0x85, 0x4f, 0xf8}};
// {fcf60a97-2a91-45c7-b357-b4cb921fe4c4}: the provider id VSS lists (vssadmin list providers).
constexpr GUID kProviderId = {0xfcf60a97, 0x2a91, 0x45c7, {0xb3, 0x57, 0xb4, 0xcb, 0x92, 0x1f, 0xe4, 0xc4}};
// {ac32ef63-7a5e-462f-a5b9-b2524ff8599c}: this version of it.
constexpr GUID kProviderVersionId = {0xac32ef63, 0x7a5e, 0x462f, {0xa5, 0xb9, 0xb2, 0x52, 0x4f, 0xf8, 0x59, 0x9c}};

inline constexpr wchar_t kProviderName[] = L"lunsync VSS hardware provider";
inline constexpr wchar_t kProviderVersion[] = L"0.1.0";
inline constexpr wchar_t kEventSource[] = L"lunsync-vss";
inline constexpr wchar_t kSettingsKey[] = L"SOFTWARE\\lunsync\\VssProvider";
// The token lives in a subkey of its own so its DACL (SYSTEM and Administrators only) does not hide the URL.
inline constexpr wchar_t kSecretKey[] = L"SOFTWARE\\lunsync\\VssProvider\\Secret";
inline constexpr wchar_t kSecretSddl[] = L"D:P(A;OICI;KA;;;SY)(A;OICI;KA;;;BA)";
constexpr DWORD kDefaultTimeoutMs = 10000;

struct Settings {
    std::wstring api_url;      // ApiUrl: http(s)://host:port of the lunsync REST API
    std::string token;         // Secret\Token: the array's api-token
    DWORD timeout_ms = kDefaultTimeoutMs;  // TimeoutMs: every WinHTTP phase (resolve, connect, send, receive)
    DWORD resync_rate_mib_s = 0;           // ResyncRateMiBps: 0 lets the array's adaptive throttle decide
};

// Read the settings from HKLM; false with a message when ApiUrl or the token is missing.
bool load_settings(Settings* out, std::wstring* error);

// One API call's outcome. hr is S_OK when the array answered 2xx with JSON; otherwise the HRESULT the VSS method
// should return, and message says why (naming the URL when the array could not be reached).
struct ApiResult {
    HRESULT hr = S_OK;
    DWORD http_status = 0;
    Json body;
    std::wstring message;
};

class ApiClient {
public:
    explicit ApiClient(Settings settings) : s_(std::move(settings)) {}
    // method is GET or POST; path starts with /v1. extra_wait_ms lengthens the receive timeout for calls that
    // wait on the array's side (POST .../wait?timeout_s=).
    ApiResult call(const wchar_t* method, const std::string& path, const Json* body, DWORD extra_wait_ms = 0) const;
    const Settings& settings() const { return s_; }

private:
    Settings s_;
};

// Map a non-2xx answer (status, parsed body) to the HRESULT VSS expects. Exposed for the unit-level checks the
// harness prints.
HRESULT hresult_for(DWORD http_status, const Json& body);

// An error event in the Application log (source lunsync-vss) and, for the caller, IErrorInfo with the same text.
void report_error(HRESULT hr, const std::wstring& message);

std::wstring widen(const std::string& utf8);
std::string narrow(const std::wstring& wide);
std::string guid_text(const GUID& g);  // xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx, lower case, no braces
std::wstring guid_wtext(const GUID& g);  // {XXXXXXXX-...}, the registry form

// VDS_LUN_INFORMATION <-> the API's JSON form (docs/provider.md). Strings and arrays written into a
// VDS_LUN_INFORMATION are CoTaskMemAlloc'ed, as VSS frees them with CoTaskMemFree.
Json lun_to_json(const VDS_LUN_INFORMATION& lun);
bool lun_from_json(const Json& j, VDS_LUN_INFORMATION* out);
void free_lun(VDS_LUN_INFORMATION* lun);
Json luns_to_json(const VDS_LUN_INFORMATION* luns, size_t count);

}  // namespace lunsync
