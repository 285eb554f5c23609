// A small JSON value with a strict parser and a serializer: just what the provider exchanges with the lunsync REST
// API (objects, arrays, strings, numbers, booleans, null). It owns nothing else. Strings are UTF-8; the parser
// refuses anything RFC 8259 does not allow (trailing commas, control characters in strings, bad escapes, lone
// surrogates) and nests at most 64 levels, so a hostile or broken answer is an error, never a crash.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace lunsync {

class Json {
public:
    enum class Type { Null, Bool, Number, String, Array, Object };

    Json() = default;
    Json(std::nullptr_t) {}
    Json(bool b) : type_(Type::Bool), bool_(b) {}
    Json(int n) : type_(Type::Number), num_(n) {}
    Json(long n) : type_(Type::Number), num_(static_cast<double>(n)) {}
    Json(unsigned long n) : type_(Type::Number), num_(static_cast<double>(n)) {}
    Json(long long n) : type_(Type::Number), num_(static_cast<double>(n)) {}
    Json(unsigned long long n) : type_(Type::Number), num_(static_cast<double>(n)) {}
    Json(double n) : type_(Type::Number), num_(n) {}
    Json(const char* s) : type_(Type::String), str_(s ? s : "") {}
    Json(std::string s) : type_(Type::String), str_(std::move(s)) {}

    static Json array() { Json j; j.type_ = Type::Array; return j; }
    static Json object() { Json j; j.type_ = Type::Object; return j; }

    Type type() const { return type_; }
    bool is_null() const { return type_ == Type::Null; }
    bool is_object() const { return type_ == Type::Object; }
    bool is_array() const { return type_ == Type::Array; }
    bool is_string() const { return type_ == Type::String; }
    bool is_number() const { return type_ == Type::Number; }
    bool is_bool() const { return type_ == Type::Bool; }

    // Typed reads with a fallback: the API's shapes are known, and a missing or mistyped field is the caller's
    // decision (usually VSS_E_UNEXPECTED_PROVIDER_ERROR), not an exception.
    bool as_bool(bool fallback = false) const { return type_ == Type::Bool ? bool_ : fallback; }
    double as_number(double fallback = 0) const { return type_ == Type::Number ? num_ : fallback; }
    const std::string& as_string() const;
    const std::vector<Json>& items() const;
    const std::map<std::string, Json>& members() const;

    // Object member (null when absent or when this is not an object).
    const Json& operator[](const std::string& key) const;
    // Array element (null when out of range).
    const Json& at(size_t i) const;
    size_t size() const;

    Json& set(const std::string& key, Json value);  // makes this an object if it is null
    Json& push(Json value);                         // makes this an array if it is null

    std::string dump() const;
    // Parse a whole document; false (with a reason in *error) on any syntax error or trailing data.
    static bool parse(const std::string& text, Json* out, std::string* error);

private:
    Type type_ = Type::Null;
    bool bool_ = false;
    double num_ = 0;
    std::string str_;
    std::vector<Json> arr_;
    std::map<std::string, Json> obj_;

    void dump_to(std::string& out) const;
};

std::string json_quote(const std::string& s);

}  // namespace lunsync
