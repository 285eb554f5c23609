// The lunsync REST client over WinHTTP, the registry settings it runs on, the HRESULT each array answer maps to,
// and the VDS_LUN_INFORMATION <-> JSON translation. Every WinHTTP call has its timeouts set, so an array that is
// down or stalled is a VSS_E_PROVIDER_VETO after at most TimeoutMs per phase, never a hang.
#include "client.h"

#include <oleauto.h>
#include <winhttp.h>

#include <cstdio>

namespace lunsync {

namespace {

bool read_string(HKEY key, const wchar_t* name, std::wstring* out) {
    DWORD type = 0, size = 0;
    if (RegQueryValueExW(key, name, nullptr, &type, nullptr, &size) != ERROR_SUCCESS || type != REG_SZ) return false;
    std::wstring buf(size / sizeof(wchar_t) + 1, L'\0');
    if (RegQueryValueExW(key, name, nullptr, &type, reinterpret_cast<BYTE*>(&buf[0]), &size) != ERROR_SUCCESS)
        return false;
    buf.resize(wcsnlen(buf.c_str(), buf.size()));
    *out = buf;
    return true;
}

bool read_dword(HKEY key, const wchar_t* name, DWORD* out) {
    DWORD type = 0, size = sizeof(DWORD), v = 0;
    if (RegQueryValueExW(key, name, nullptr, &type, reinterpret_cast<BYTE*>(&v), &size) != ERROR_SUCCESS ||
        type != REG_DWORD)
        return false;
    *out = v;
    return true;
}

std::wstring winhttp_error(DWORD code) {
    switch (code) {
        case ERROR_WINHTTP_TIMEOUT:
        case WSAETIMEDOUT:  // Wine's WinHTTP passes the socket's error through
            return L"timed out";
        case ERROR_WINHTTP_CANNOT_CONNECT:
        case WSAECONNREFUSED:
            return L"cannot connect";
        case ERROR_WINHTTP_CONNECTION_ERROR: return L"connection reset";
        case ERROR_WINHTTP_NAME_NOT_RESOLVED: return L"name not resolved";
        case ERROR_WINHTTP_INVALID_URL: return L"invalid URL";
        case ERROR_WINHTTP_UNRECOGNIZED_SCHEME: return L"unrecognized scheme";
        case ERROR_WINHTTP_SECURE_FAILURE: return L"TLS failure";
        case ERROR_WINHTTP_INVALID_SERVER_RESPONSE: return L"invalid server response";
        default: return L"error";
    }
}

struct Handle {
    HINTERNET h = nullptr;
    explicit Handle(HINTERNET x) : h(x) {}
    ~Handle() { if (h) WinHttpCloseHandle(h); }
    Handle(const Handle&) = delete;
    Handle& operator=(const Handle&) = delete;
};

// VSS error names the array sends (provider/vss.py VssCode) and what they are here. Only these pass through; any
// other refusal is the provider's unexpected error, so an HRESULT VSS does not document for a method never leaks.
struct Known {
    const char* name;
    HRESULT hr;
};
constexpr Known kKnown[] = {
    {"VSS_E_OBJECT_NOT_FOUND", VSS_E_OBJECT_NOT_FOUND},
    {"VSS_E_PROVIDER_VETO", VSS_E_PROVIDER_VETO},
    {"VSS_E_INSUFFICIENT_STORAGE", VSS_E_INSUFFICIENT_STORAGE},
    {"VSS_E_RESYNC_IN_PROGRESS", VSS_E_RESYNC_IN_PROGRESS},
    {"VSS_E_BAD_STATE", VSS_E_BAD_STATE},
    {"E_INVALIDARG", E_INVALIDARG},
};

const char* hex_digits = "0123456789abcdef";

int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

char* dup_string(const std::string& s) {
    char* p = static_cast<char*>(CoTaskMemAlloc(s.size() + 1));
    if (p) memcpy(p, s.c_str(), s.size() + 1);
    return p;
}

std::string field(const char* s) { return s ? std::string(s) : std::string(); }

}  // namespace

std::wstring widen(const std::string& utf8) {
    if (utf8.empty()) return {};
    int n = MultiByteToWideChar(CP_UTF8, 0, utf8.data(), static_cast<int>(utf8.size()), nullptr, 0);
    std::wstring out(static_cast<size_t>(n), L'\0');
    MultiByteToWideChar(CP_UTF8, 0, utf8.data(), static_cast<int>(utf8.size()), &out[0], n);
    return out;
}

std::string narrow(const std::wstring& wide) {
    if (wide.empty()) return {};
    int n = WideCharToMultiByte(CP_UTF8, 0, wide.data(), static_cast<int>(wide.size()), nullptr, 0, nullptr, nullptr);
    std::string out(static_cast<size_t>(n), '\0');
    WideCharToMultiByte(CP_UTF8, 0, wide.data(), static_cast<int>(wide.size()), &out[0], n, nullptr, nullptr);
    return out;
}

std::string guid_text(const GUID& g) {
    char buf[40];
    std::snprintf(buf, sizeof buf, "%08lx-%04x-%04x-%02x%02x-%02x%02x%02x%02x%02x%02x",
                  static_cast<unsigned long>(g.Data1), g.Data2, g.Data3, g.Data4[0], g.Data4[1], g.Data4[2],
                  g.Data4[3], g.Data4[4], g.Data4[5], g.Data4[6], g.Data4[7]);
    return buf;
}

std::wstring guid_wtext(const GUID& g) {
    wchar_t buf[40];
    StringFromGUID2(g, buf, 40);
    return buf;
}

bool load_settings(Settings* out, std::wstring* error) {
    Settings s;
    HKEY key = nullptr;
    if (RegOpenKeyExW(HKEY_LOCAL_MACHINE, kSettingsKey, 0, KEY_READ, &key) != ERROR_SUCCESS) {
        *error = std::wstring(L"lunsync-vss is not configured: HKLM\\") + kSettingsKey +
                 L" is missing (run lunsync-vss.exe install --api URL --token-file F)";
        return false;
    }
    bool have_url = read_string(key, L"ApiUrl", &s.api_url);
    read_dword(key, L"TimeoutMs", &s.timeout_ms);
    read_dword(key, L"ResyncRateMiBps", &s.resync_rate_mib_s);
    RegCloseKey(key);
    if (!have_url || s.api_url.empty()) {
        *error = std::wstring(L"lunsync-vss is not configured: HKLM\\") + kSettingsKey + L"\\ApiUrl is missing";
        return false;
    }
    if (s.timeout_ms < 100) s.timeout_ms = 100;
    std::wstring token;
    if (RegOpenKeyExW(HKEY_LOCAL_MACHINE, kSecretKey, 0, KEY_READ, &key) != ERROR_SUCCESS) {
        *error = std::wstring(L"cannot open HKLM\\") + kSecretKey + L" (the provider runs as SYSTEM; is it installed?)";
        return false;
    }
    bool have_token = read_string(key, L"Token", &token);
    RegCloseKey(key);
    if (!have_token || token.empty()) {
        *error = std::wstring(L"HKLM\\") + kSecretKey + L"\\Token is missing";
        return false;
    }
    s.token = narrow(token);
    *out = std::move(s);
    return true;
}

HRESULT hresult_for(DWORD http_status, const Json& body) {
    if (http_status == 401 || http_status == 403) return VSS_E_PROVIDER_VETO;
    const std::string& code = body["code"].as_string();
    for (const Known& k : kKnown)
        if (code == k.name) return k.hr;
    return VSS_E_UNEXPECTED_PROVIDER_ERROR;
}

ApiResult ApiClient::call(const wchar_t* method, const std::string& path, const Json* body,
                          DWORD extra_wait_ms) const {
    ApiResult r;
    std::wstring url = s_.api_url;
    while (!url.empty() && url.back() == L'/') url.pop_back();
    std::wstring full = url + widen(path);
    auto fail = [&](HRESULT hr, const std::wstring& why) {
        r.hr = hr;
        r.message = std::wstring(L"lunsync API ") + method + L" " + full + L": " + why;
        return r;
    };

    URL_COMPONENTS parts{};
    parts.dwStructSize = sizeof parts;
    wchar_t host[256] = {};
    parts.lpszHostName = host;
    parts.dwHostNameLength = 255;
    parts.dwUrlPathLength = static_cast<DWORD>(-1);
    parts.dwSchemeLength = static_cast<DWORD>(-1);
    if (!WinHttpCrackUrl(url.c_str(), 0, 0, &parts))
        return fail(VSS_E_PROVIDER_VETO,
                    L"ApiUrl is not a URL (WinHTTP error " + std::to_wstring(GetLastError()) + L")");
    bool secure = parts.nScheme == INTERNET_SCHEME_HTTPS;
    std::wstring base_path(parts.lpszUrlPath ? parts.lpszUrlPath : L"", parts.dwUrlPathLength);
    std::wstring object = base_path + widen(path);

    Handle session(WinHttpOpen(L"lunsync-vss/0.1", WINHTTP_ACCESS_TYPE_NO_PROXY, WINHTTP_NO_PROXY_NAME,
                               WINHTTP_NO_PROXY_BYPASS, 0));
    if (!session.h) return fail(VSS_E_UNEXPECTED_PROVIDER_ERROR, L"WinHttpOpen failed");
    int t = static_cast<int>(s_.timeout_ms);
    if (!WinHttpSetTimeouts(session.h, t, t, t, t + static_cast<int>(extra_wait_ms)))
        return fail(VSS_E_UNEXPECTED_PROVIDER_ERROR, L"WinHttpSetTimeouts failed");
    Handle conn(WinHttpConnect(session.h, host, parts.nPort, 0));
    if (!conn.h) return fail(VSS_E_PROVIDER_VETO, L"cannot connect (WinHTTP " + std::to_wstring(GetLastError()) + L")");
    Handle req(WinHttpOpenRequest(conn.h, method, object.c_str(), nullptr, WINHTTP_NO_REFERER,
                                  WINHTTP_DEFAULT_ACCEPT_TYPES, secure ? WINHTTP_FLAG_SECURE : 0));
    if (!req.h) return fail(VSS_E_UNEXPECTED_PROVIDER_ERROR, L"WinHttpOpenRequest failed");
    // WinHttpSetTimeouts does not cover the wait for the response headers, which has a timeout of its own
    // (WINHTTP_OPTION_RECEIVE_RESPONSE_TIMEOUT, 90 s by default): without this, an array that accepts and never
    // answers would hold VSS for 90 s.
    DWORD response_ms = s_.timeout_ms + extra_wait_ms;
    if (!WinHttpSetOption(req.h, WINHTTP_OPTION_RECEIVE_RESPONSE_TIMEOUT, &response_ms, sizeof response_ms))
        return fail(VSS_E_UNEXPECTED_PROVIDER_ERROR, L"setting the response timeout failed");

    std::wstring headers = L"Authorization: Bearer " + widen(s_.token) + L"\r\nAccept: application/json\r\n";
    std::string payload;
    if (body) {
        payload = body->dump();
        headers += L"Content-Type: application/json\r\n";
    }
    BOOL sent = WinHttpSendRequest(req.h, headers.c_str(), static_cast<DWORD>(-1),
                                   payload.empty() ? WINHTTP_NO_REQUEST_DATA : &payload[0],
                                   static_cast<DWORD>(payload.size()), static_cast<DWORD>(payload.size()), 0);
    if (!sent || !WinHttpReceiveResponse(req.h, nullptr)) {
        DWORD e = GetLastError();
        return fail(VSS_E_PROVIDER_VETO, L"the array did not answer: " + winhttp_error(e) + L" (WinHTTP error " +
                                             std::to_wstring(e) + L")");
    }
    DWORD status = 0, size = sizeof status;
    WinHttpQueryHeaders(req.h, WINHTTP_QUERY_STATUS_CODE | WINHTTP_QUERY_FLAG_NUMBER, WINHTTP_HEADER_NAME_BY_INDEX,
                        &status, &size, WINHTTP_NO_HEADER_INDEX);
    r.http_status = status;
    std::string text;
    constexpr size_t kMaxBody = 16 << 20;  // the largest answer (every LUN of a big array) is far below this
    while (true) {
        DWORD avail = 0;
        if (!WinHttpQueryDataAvailable(req.h, &avail)) {
            DWORD e = GetLastError();
            return fail(VSS_E_PROVIDER_VETO, L"reading the answer failed: " + winhttp_error(e) + L" (WinHTTP error " +
                                                 std::to_wstring(e) + L")");
        }
        if (avail == 0) break;
        if (text.size() + avail > kMaxBody) return fail(VSS_E_UNEXPECTED_PROVIDER_ERROR, L"answer too large");
        size_t at = text.size();
        text.resize(at + avail);
        DWORD got = 0;
        if (!WinHttpReadData(req.h, &text[at], avail, &got)) {
            DWORD e = GetLastError();
            return fail(VSS_E_PROVIDER_VETO, L"reading the answer failed (WinHTTP error " + std::to_wstring(e) + L")");
        }
        text.resize(at + got);
    }
    std::string parse_error;
    bool parsed = Json::parse(text, &r.body, &parse_error);
    if (status >= 200 && status < 300) {
        if (!parsed) return fail(VSS_E_UNEXPECTED_PROVIDER_ERROR, L"the answer is not JSON: " + widen(parse_error));
        r.hr = S_OK;
        return r;
    }
    std::wstring detail = L"HTTP " + std::to_wstring(status);
    if (status == 401 || status == 403) {
        detail += L": the array refused the token (HKLM\\" + std::wstring(kSecretKey) + L"\\Token)";
    } else if (parsed && r.body["error"].is_string()) {
        detail += L": " + widen(r.body["error"].as_string());
    } else if (parsed && !r.body["detail"].is_null()) {
        detail += L": " + widen(r.body["detail"].is_string() ? r.body["detail"].as_string() : r.body["detail"].dump());
    }
    return fail(hresult_for(status, parsed ? r.body : Json()), detail);
}

void report_error(HRESULT hr, const std::wstring& message) {
    wchar_t code[16];
    swprintf(code, 16, L"0x%08lX", static_cast<unsigned long>(hr));
    std::wstring text = message + L" [" + code + L"]";
    HANDLE log = RegisterEventSourceW(nullptr, kEventSource);
    if (log) {
        const wchar_t* strings[1] = {text.c_str()};
        // Event id 1 with the whole text as its one insertion string: with no message file registered for the
        // source, Event Viewer still shows the insertion strings, which is all an administrator needs here.
        ReportEventW(log, EVENTLOG_ERROR_TYPE, 0, 1, nullptr, 1, 0, strings, nullptr);
        DeregisterEventSource(log);
    }
    ICreateErrorInfo* create = nullptr;
    if (SUCCEEDED(CreateErrorInfo(&create))) {
        create->SetSource(const_cast<LPOLESTR>(kEventSource));
        create->SetDescription(const_cast<LPOLESTR>(text.c_str()));
        IErrorInfo* info = nullptr;
        if (SUCCEEDED(create->QueryInterface(IID_IErrorInfo, reinterpret_cast<void**>(&info)))) {
            SetErrorInfo(0, info);
            info->Release();
        }
        create->Release();
    }
}

// -- VDS_LUN_INFORMATION <-> JSON --------------------------------------------------------------------------------

Json lun_to_json(const VDS_LUN_INFORMATION& lun) {
    Json ids = Json::array();
    for (ULONG i = 0; i < lun.m_deviceIdDescriptor.m_cIdentifiers && lun.m_deviceIdDescriptor.m_rgIdentifiers; ++i) {
        const VDS_STORAGE_IDENTIFIER& id = lun.m_deviceIdDescriptor.m_rgIdentifiers[i];
        std::string value;
        const BYTE* b = id.m_rgbIdentifier;
        if (id.m_CodeSet == VDSStorageIdCodeSetBinary) {
            for (ULONG k = 0; k < id.m_cbIdentifier && b; ++k) {
                value += hex_digits[b[k] >> 4];
                value += hex_digits[b[k] & 0xF];
            }
        } else if (b) {
            value.assign(reinterpret_cast<const char*>(b), id.m_cbIdentifier);
            value.resize(strnlen(value.c_str(), value.size()));
        }
        // VDS_STORAGE_IDENTIFIER has no association field: VDS reports the logical unit's descriptors (0).
        ids.push(Json::object()
                     .set("code_set", static_cast<int>(id.m_CodeSet))
                     .set("type", static_cast<int>(id.m_Type))
                     .set("association", 0)
                     .set("identifier", value));
    }
    Json j = Json::object();
    j.set("version", static_cast<long long>(lun.m_version))
        .set("device_type", static_cast<int>(lun.m_DeviceType))
        .set("device_type_modifier", static_cast<int>(lun.m_DeviceTypeModifier))
        .set("command_queueing", lun.m_bCommandQueueing != FALSE)
        .set("bus_type", static_cast<int>(lun.m_BusType))
        .set("vendor_id", field(lun.m_szVendorId))
        .set("product_id", field(lun.m_szProductId))
        .set("product_revision", field(lun.m_szProductRevision))
        .set("serial_number", field(lun.m_szSerialNumber))
        .set("device_id_descriptor", Json::object()
                                         .set("version", static_cast<long long>(lun.m_deviceIdDescriptor.m_version))
                                         .set("identifiers", ids))
        .set("interconnects", Json::array());
    return j;
}

Json luns_to_json(const VDS_LUN_INFORMATION* luns, size_t count) {
    Json a = Json::array();
    for (size_t i = 0; i < count; ++i) a.push(lun_to_json(luns[i]));
    return a;
}

void free_lun(VDS_LUN_INFORMATION* lun) {
    CoTaskMemFree(lun->m_szVendorId);
    CoTaskMemFree(lun->m_szProductId);
    CoTaskMemFree(lun->m_szProductRevision);
    CoTaskMemFree(lun->m_szSerialNumber);
    VDS_STORAGE_DEVICE_ID_DESCRIPTOR& d = lun->m_deviceIdDescriptor;
    for (ULONG i = 0; i < d.m_cIdentifiers && d.m_rgIdentifiers; ++i)
        CoTaskMemFree(d.m_rgIdentifiers[i].m_rgbIdentifier);
    CoTaskMemFree(d.m_rgIdentifiers);
    for (ULONG i = 0; i < lun->m_cInterconnects && lun->m_rgInterconnects; ++i) {
        CoTaskMemFree(lun->m_rgInterconnects[i].m_pbPort);
        CoTaskMemFree(lun->m_rgInterconnects[i].m_pbAddress);
    }
    CoTaskMemFree(lun->m_rgInterconnects);
    *lun = VDS_LUN_INFORMATION{};
}

bool lun_from_json(const Json& j, VDS_LUN_INFORMATION* out) {
    if (!j.is_object()) return false;
    VDS_LUN_INFORMATION lun{};
    lun.m_version = VER_VDS_LUN_INFORMATION;
    lun.m_DeviceType = static_cast<BYTE>(j["device_type"].as_number(0));
    lun.m_DeviceTypeModifier = static_cast<BYTE>(j["device_type_modifier"].as_number(0));
    lun.m_bCommandQueueing = j["command_queueing"].as_bool(true) ? TRUE : FALSE;
    lun.m_BusType = static_cast<VDS_STORAGE_BUS_TYPE>(static_cast<int>(j["bus_type"].as_number(VDSBusTypeiScsi)));
    lun.m_szVendorId = dup_string(j["vendor_id"].as_string());
    lun.m_szProductId = dup_string(j["product_id"].as_string());
    lun.m_szProductRevision = dup_string(j["product_revision"].as_string());
    lun.m_szSerialNumber = dup_string(j["serial_number"].as_string());
    const Json& ids = j["device_id_descriptor"]["identifiers"];
    lun.m_deviceIdDescriptor.m_version = 1;
    bool ok = lun.m_szVendorId && lun.m_szProductId && lun.m_szProductRevision && lun.m_szSerialNumber;
    if (ok && ids.size() > 0) {
        size_t n = ids.size();
        lun.m_deviceIdDescriptor.m_rgIdentifiers =
            static_cast<VDS_STORAGE_IDENTIFIER*>(CoTaskMemAlloc(n * sizeof(VDS_STORAGE_IDENTIFIER)));
        ok = lun.m_deviceIdDescriptor.m_rgIdentifiers != nullptr;
        for (size_t i = 0; ok && i < n; ++i) {
            const Json& id = ids.at(i);
            VDS_STORAGE_IDENTIFIER& v = lun.m_deviceIdDescriptor.m_rgIdentifiers[i];
            v = VDS_STORAGE_IDENTIFIER{};
            lun.m_deviceIdDescriptor.m_cIdentifiers = static_cast<ULONG>(i + 1);
            v.m_CodeSet = static_cast<VDS_STORAGE_IDENTIFIER_CODE_SET>(static_cast<int>(id["code_set"].as_number(1)));
            v.m_Type = static_cast<VDS_STORAGE_IDENTIFIER_TYPE>(static_cast<int>(id["type"].as_number(3)));
            const std::string& text = id["identifier"].as_string();
            std::string raw;
            if (v.m_CodeSet == VDSStorageIdCodeSetBinary) {
                if (text.size() % 2) { ok = false; break; }
                for (size_t k = 0; k < text.size(); k += 2) {
                    int hi = hex_value(text[k]), lo = hex_value(text[k + 1]);
                    if (hi < 0 || lo < 0) { ok = false; break; }
                    raw += static_cast<char>(hi << 4 | lo);
                }
            } else {
                raw = text;
            }
            if (!ok) break;
            v.m_cbIdentifier = static_cast<ULONG>(raw.size());
            v.m_rgbIdentifier = static_cast<BYTE*>(CoTaskMemAlloc(raw.size() ? raw.size() : 1));
            if (!v.m_rgbIdentifier) { ok = false; break; }
            memcpy(v.m_rgbIdentifier, raw.data(), raw.size());
        }
    }
    if (!ok) {
        free_lun(&lun);
        return false;
    }
    *out = lun;
    return true;
}

}  // namespace lunsync
