// lunsync-vss-harness.exe: plays the VSS service against the provider DLL, for the tests (under Wine) and for a
// first check on a Windows host. It creates the provider through COM (CoCreateInstance of its CLSID, as VSS does)
// and calls its methods in VSS's order. Every step prints one JSON line: {"step", "hr", ...}; a failing step adds
// the IErrorInfo text the provider set. At "pause" lines it waits for one line on stdin, so the caller can look at
// the LUNs (qemu-io, iscsi-inq) between steps.
//   full --lun SPEC --lun SPEC --bed SPEC   the whole lifecycle on a two-LUN set (see tests/provider/test_windows.py)
//   probe --lun SPEC                        GetProviderCapabilities and AreLunsSupported (error paths)
//   prepare --lun SPEC                      BeginPrepareSnapshot, EndPrepareSnapshots, AbortSnapshots
// SPEC is VENDOR|PRODUCT|REVISION|SERIAL|NAA-HEX, what INQUIRY and VPD pages 0x80/0x83 of the LUN say.
#include <windows.h>
#include <oleauto.h>
#include <vdslun.h>
#include <vsprov.h>
#include <vss.h>

#include <cstdio>
#include <iostream>
#include <string>
#include <vector>

#include "client.h"

using lunsync::Json;

namespace {

std::string hr_text(HRESULT hr) {
    char buf[16];
    snprintf(buf, sizeof buf, "0x%08lX", static_cast<unsigned long>(hr));
    return buf;
}

std::string error_info() {
    IErrorInfo* info = nullptr;
    std::string out;
    if (GetErrorInfo(0, &info) == S_OK && info) {
        BSTR text = nullptr;
        if (SUCCEEDED(info->GetDescription(&text)) && text) {
            out = lunsync::narrow(text);
            SysFreeString(text);
        }
        info->Release();
    }
    return out;
}

ULONGLONG g_start = GetTickCount64();

void emit(const std::string& step, HRESULT hr, Json extra = Json::object()) {
    extra.set("step", step).set("hr", hr_text(hr))
        .set("ms", static_cast<unsigned long long>(GetTickCount64() - g_start));
    if (FAILED(hr)) extra.set("error", error_info());
    printf("%s\n", extra.dump().c_str());
    fflush(stdout);
}

void pause(const std::string& name) {
    printf("%s\n", Json::object().set("step", "pause").set("name", name).dump().c_str());
    fflush(stdout);
    std::string line;
    std::getline(std::cin, line);
}

std::vector<std::string> split(const std::string& s, char sep) {
    std::vector<std::string> out(1);
    for (char c : s) {
        if (c == sep) out.emplace_back();
        else out.back() += c;
    }
    return out;
}

// A VDS_LUN_INFORMATION as VSS builds it from a disk: INQUIRY strings, the serial and one NAA descriptor (or none
// when NAA is empty: then only the serial names the LUN).
bool parse_spec(const std::string& spec, VDS_LUN_INFORMATION* out) {
    std::vector<std::string> f = split(spec, '|');
    if (f.size() != 5) return false;
    Json ids = Json::array();
    if (!f[4].empty())
        ids.push(Json::object().set("code_set", 1).set("type", 3).set("association", 0).set("identifier", f[4]));
    Json j = Json::object()
                 .set("vendor_id", f[0]).set("product_id", f[1]).set("product_revision", f[2])
                 .set("serial_number", f[3]).set("bus_type", 9)
                 .set("device_id_descriptor", Json::object().set("version", 1).set("identifiers", ids));
    return lunsync::lun_from_json(j, out);
}

Json describe(const VDS_LUN_INFORMATION& lun) { return lunsync::lun_to_json(lun); }

struct Provider {
    IVssHardwareSnapshotProviderEx* hw = nullptr;
    IVssProviderCreateSnapshotSet* create = nullptr;
    IVssProviderNotifications* notify = nullptr;

    bool load() {
        HRESULT hr = CoCreateInstance(lunsync::kProviderClsid, nullptr, CLSCTX_INPROC_SERVER,
                                      IID_IVssHardwareSnapshotProviderEx, reinterpret_cast<void**>(&hw));
        Json j = Json::object();
        if (SUCCEEDED(hr)) {
            j.set("IVssHardwareSnapshotProvider", SUCCEEDED(probe(IID_IVssHardwareSnapshotProvider)));
            HRESULT c = hw->QueryInterface(IID_IVssProviderCreateSnapshotSet, reinterpret_cast<void**>(&create));
            HRESULT n = hw->QueryInterface(IID_IVssProviderNotifications, reinterpret_cast<void**>(&notify));
            j.set("IVssProviderCreateSnapshotSet", SUCCEEDED(c)).set("IVssProviderNotifications", SUCCEEDED(n))
                .set("IVssSoftwareSnapshotProvider", SUCCEEDED(probe(IID_IVssSoftwareSnapshotProvider)));
            if (FAILED(c) || FAILED(n)) hr = E_NOINTERFACE;
        }
        emit("CoCreateInstance", hr, j);
        if (FAILED(hr)) return false;
        emit("OnLoad", notify->OnLoad(nullptr));
        return true;
    }

    HRESULT probe(REFIID iid) {
        IUnknown* u = nullptr;
        HRESULT hr = hw->QueryInterface(iid, reinterpret_cast<void**>(&u));
        if (u) u->Release();
        return hr;
    }

    void unload() {
        if (notify) {
            emit("OnUnload", notify->OnUnload(FALSE));
            notify->Release();
        }
        if (create) create->Release();
        if (hw) hw->Release();
        // Every object released: the DLL must now agree to be unloaded (S_OK), or a reference leaked.
        HMODULE dll = GetModuleHandleW(L"lunsync-vss.dll");
        using Fn = HRESULT(STDAPICALLTYPE*)();
        Fn can_unload = dll ? reinterpret_cast<Fn>(reinterpret_cast<void*>(GetProcAddress(dll, "DllCanUnloadNow")))
                            : nullptr;
        emit("DllCanUnloadNow", can_unload ? can_unload() : E_FAIL);
    }
};

HRESULT capabilities(Provider& p) {
    ULONGLONG mask = 0;
    HRESULT hr = p.hw->GetProviderCapabilities(&mask);
    emit("GetProviderCapabilities", hr, Json::object().set("mask", static_cast<unsigned long long>(mask)));
    return hr;
}

HRESULT supported(Provider& p, const char* step, std::vector<VDS_LUN_INFORMATION>& luns) {
    BOOL ok = FALSE;
    std::vector<VSS_PWSZ> names(luns.size(), nullptr);
    HRESULT hr = p.hw->AreLunsSupported(static_cast<LONG>(luns.size()), VSS_CTX_BACKUP, names.data(), luns.data(),
                                        &ok);
    emit(step, hr, Json::object().set("supported", ok != FALSE));
    return hr;
}

HRESULT fill_in(Provider& p, const char* step, const VDS_LUN_INFORMATION& from) {
    // What Windows has before the array fills in: the INQUIRY strings and the serial, no device-ID descriptors.
    Json partial = describe(from);
    partial.set("device_id_descriptor", Json::object().set("version", 1).set("identifiers", Json::array()));
    VDS_LUN_INFORMATION lun{};
    lunsync::lun_from_json(partial, &lun);
    BOOL ok = FALSE;
    HRESULT hr = p.hw->FillInLunInfo(nullptr, &lun, &ok);
    emit(step, hr, Json::object().set("supported", ok != FALSE).set("lun", describe(lun)));
    lunsync::free_lun(&lun);
    return hr;
}

// QueryStatus until the set is no longer pending; one line per change of percent.
HRESULT poll(IVssAsync* async, const char* step) {
    HRESULT status = VSS_S_ASYNC_PENDING, hr = S_OK;
    int last = -1, polls = 0;
    while (status == VSS_S_ASYNC_PENDING) {
        INT percent = 0;
        hr = async->QueryStatus(&status, &percent);
        ++polls;
        if (FAILED(hr)) break;
        if (percent != last || status != VSS_S_ASYNC_PENDING) {
            emit(step, hr, Json::object().set("status", hr_text(status)).set("percent", percent));
            last = percent;
        }
        if (status == VSS_S_ASYNC_PENDING) Sleep(100);
    }
    emit(std::string(step) + "-end", hr, Json::object().set("status", hr_text(status)).set("polls", polls));
    return hr;
}

int full(std::vector<VDS_LUN_INFORMATION>& luns, VDS_LUN_INFORMATION& bed) {
    Provider p;
    if (!p.load()) return 2;
    capabilities(p);
    supported(p, "AreLunsSupported", luns);
    // The same INQUIRY strings with an identity the array never gave out: only the array can say it is not its own.
    Json foreign_j = describe(luns[0]);
    foreign_j.set("serial_number", "NOT-A-LUNSYNC-LUN");
    Json ids = Json::array();
    ids.push(Json::object().set("code_set", 1).set("type", 3).set("association", 0)
                 .set("identifier", "60000000000000000000000000000001"));
    foreign_j.set("device_id_descriptor", Json::object().set("version", 1).set("identifiers", ids));
    std::vector<VDS_LUN_INFORMATION> foreign(1);
    lunsync::lun_from_json(foreign_j, &foreign[0]);
    supported(p, "AreLunsSupported-foreign", foreign);
    fill_in(p, "FillInLunInfo", luns[0]);

    GUID set{}, snap_a{}, snap_b{};
    CoCreateGuid(&set);
    CoCreateGuid(&snap_a);
    CoCreateGuid(&snap_b);
    Json set_j = Json::object().set("snapshot_set_id", lunsync::guid_text(set));
    emit("BeginPrepareSnapshot", p.hw->BeginPrepareSnapshot(set, snap_a, VSS_CTX_BACKUP, 1, nullptr, &luns[0]), set_j);
    emit("BeginPrepareSnapshot", p.hw->BeginPrepareSnapshot(set, snap_b, VSS_CTX_BACKUP, 1, nullptr, &luns[1]), set_j);
    emit("EndPrepareSnapshots", p.create->EndPrepareSnapshots(set));
    emit("PreCommitSnapshots", p.create->PreCommitSnapshots(set));
    emit("CommitSnapshots", p.create->CommitSnapshots(set));
    emit("PostCommitSnapshots", p.create->PostCommitSnapshots(set, 2));
    emit("PreFinalCommitSnapshots", p.create->PreFinalCommitSnapshots(set));
    emit("PostFinalCommitSnapshots", p.create->PostFinalCommitSnapshots(set));

    std::vector<VDS_LUN_INFORMATION> targets(2);
    HRESULT hr = p.hw->GetTargetLuns(2, nullptr, luns.data(), targets.data());
    Json tj = Json::array();
    for (auto& t : targets) tj.push(describe(t));
    emit("GetTargetLuns", hr, Json::object().set("luns", tj));
    if (FAILED(hr)) return 2;
    emit("LocateLuns", p.hw->LocateLuns(2, targets.data()));
    fill_in(p, "FillInLunInfo-snapshot", targets[0]);
    pause("exposed");

    emit("OnLunStateChange-pre-recovery",
         p.hw->OnLunStateChange(targets.data(), luns.data(), 2, VSS_ONLUNSTATECHANGE_NOTIFY_LUN_PRE_RECOVERY));
    IVssAsync* async = nullptr;
    hr = p.hw->ResyncLuns(targets.data(), luns.data(), 2, &async);
    emit("ResyncLuns", hr);
    if (FAILED(hr)) return 2;
    pause("resyncing");
    poll(async, "QueryStatus");
    async->Release();
    emit("OnLunStateChange-post-recovery",
         p.hw->OnLunStateChange(targets.data(), luns.data(), 2, VSS_ONLUNSTATECHANGE_NOTIFY_LUN_POST_RECOVERY));
    pause("restored");

    // The test-bed refresh: the snapshot of the first LUN onto another LUN, waited for with IVssAsync::Wait.
    hr = p.hw->ResyncLuns(&targets[0], &bed, 1, &async);
    emit("ResyncLuns-bed", hr);
    if (FAILED(hr)) return 2;
    emit("Wait", async->Wait(INFINITE));
    poll(async, "QueryStatus-bed");
    async->Release();
    pause("bed");

    // A second restore onto a LUN that is still being restored is refused; the first one is cancelled.
    hr = p.hw->ResyncLuns(&targets[1], &bed, 1, &async);
    emit("ResyncLuns-bed-again", hr);
    if (SUCCEEDED(hr)) {
        IVssAsync* second = nullptr;
        HRESULT busy = p.hw->ResyncLuns(&targets[0], &bed, 1, &second);
        emit("ResyncLuns-in-progress", busy);
        if (second) second->Release();
        emit("Cancel", async->Cancel());
        poll(async, "QueryStatus-cancelled");
        emit("Cancel-after-end", async->Cancel());
        async->Release();
    }

    emit("OnLunStateChange-read-write",
         p.hw->OnLunStateChange(targets.data(), luns.data(), 2, VSS_ONLUNSTATECHANGE_NOTIFY_READ_WRITE));
    emit("OnLunStateChange-mask", p.hw->OnLunStateChange(&targets[1], nullptr, 1, VSS_ONLUNSTATECHANGE_DO_MASK_LUNS));
    emit("OnReuseLuns", p.hw->OnReuseLuns(&targets[1], &luns[1], 1));
    emit("OnLunEmpty", p.hw->OnLunEmpty(nullptr, &targets[0]));

    // A set that VSS gives up on after the commit: AbortSnapshots deletes what it made.
    GUID set2{}, snap2{};
    CoCreateGuid(&set2);
    CoCreateGuid(&snap2);
    Json set2_j = Json::object().set("snapshot_set_id", lunsync::guid_text(set2));
    emit("BeginPrepareSnapshot-2", p.hw->BeginPrepareSnapshot(set2, snap2, VSS_CTX_BACKUP, 1, nullptr, &luns[0]),
         set2_j);
    emit("EndPrepareSnapshots-2", p.create->EndPrepareSnapshots(set2));
    emit("PreCommitSnapshots-2", p.create->PreCommitSnapshots(set2));
    emit("CommitSnapshots-2", p.create->CommitSnapshots(set2));
    emit("AbortSnapshots", p.create->AbortSnapshots(set2), set2_j);
    GUID never{};
    CoCreateGuid(&never);
    emit("AbortSnapshots-unknown", p.create->AbortSnapshots(never));
    pause("cleaned");

    for (auto& t : targets) lunsync::free_lun(&t);
    lunsync::free_lun(&foreign[0]);
    p.unload();
    emit("done", S_OK);
    return 0;
}

int probe(std::vector<VDS_LUN_INFORMATION>& luns) {
    Provider p;
    if (!p.load()) return 2;
    capabilities(p);
    supported(p, "AreLunsSupported", luns);
    p.unload();
    return 0;
}

int prepare(std::vector<VDS_LUN_INFORMATION>& luns) {
    Provider p;
    if (!p.load()) return 2;
    GUID set{}, snap{};
    CoCreateGuid(&set);
    CoCreateGuid(&snap);
    emit("BeginPrepareSnapshot", p.hw->BeginPrepareSnapshot(set, snap, VSS_CTX_BACKUP,
                                                            static_cast<LONG>(luns.size()), nullptr, luns.data()));
    emit("EndPrepareSnapshots", p.create->EndPrepareSnapshots(set));
    emit("AbortSnapshots", p.create->AbortSnapshots(set));
    p.unload();
    return 0;
}

}  // namespace

int wmain(int argc, wchar_t** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: lunsync-vss-harness.exe full|probe|prepare --lun SPEC ... [--bed SPEC]\n");
        return 1;
    }
    if (FAILED(CoInitializeEx(nullptr, COINIT_MULTITHREADED))) return 2;
    std::wstring mode = argv[1];
    std::vector<VDS_LUN_INFORMATION> luns;
    VDS_LUN_INFORMATION bed{};
    bool have_bed = false;
    for (int i = 2; i + 1 < argc; i += 2) {
        std::wstring flag = argv[i];
        VDS_LUN_INFORMATION lun{};
        if (!parse_spec(lunsync::narrow(argv[i + 1]), &lun)) {
            fprintf(stderr, "bad LUN spec %s\n", lunsync::narrow(argv[i + 1]).c_str());
            return 1;
        }
        if (flag == L"--lun") {
            luns.push_back(lun);
        } else if (flag == L"--bed") {
            bed = lun;
            have_bed = true;
        } else {
            return 1;
        }
    }
    int rc = 1;
    if (mode == L"full" && luns.size() == 2 && have_bed) rc = full(luns, bed);
    else if (mode == L"probe" && !luns.empty()) rc = probe(luns);
    else if (mode == L"prepare" && !luns.empty()) rc = prepare(luns);
    for (auto& l : luns) lunsync::free_lun(&l);
    if (have_bed) lunsync::free_lun(&bed);
    CoUninitialize();
    return rc;
}
